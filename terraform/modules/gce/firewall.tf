# Ingress rules; egress stays open (packages, Google APIs, relays between nodes). Instances are selected by
# service account. ZooKeeper admits only the cluster's own accounts; RTMP is the only port open to the
# world, and only on media nodes.

resource "google_compute_firewall" "zookeeper_clients" {
  project                 = var.project_id
  name                    = "${var.name}-zookeeper-clients"
  description             = "ZooKeeper clients: API servers, controllers and node agents of every region"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_service_accounts = [google_service_account.api.email, google_service_account.controller.email, google_service_account.node.email]
  target_service_accounts = [google_service_account.zookeeper.email]

  allow {
    protocol = "tcp"
    ports    = ["2181"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "zookeeper_quorum" {
  project                 = var.project_id
  name                    = "${var.name}-zookeeper-quorum"
  description             = "ZooKeeper quorum and leader election between members"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_service_accounts = [google_service_account.zookeeper.email]
  target_service_accounts = [google_service_account.zookeeper.email]

  allow {
    protocol = "tcp"
    ports    = ["2888", "3888"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Google's front ends and health checkers reach the backends from these ranges only.
resource "google_compute_firewall" "api_from_load_balancer" {
  project                 = var.project_id
  name                    = "${var.name}-api-from-load-balancer"
  description             = "API traffic and health checks from the external Application Load Balancer"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_ranges           = ["35.191.0.0/16", "130.211.0.0/22"]
  target_service_accounts = [google_service_account.api.email]

  allow {
    protocol = "tcp"
    ports    = [var.api_port]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "media_rtmp" {
  project                 = var.project_id
  name                    = "${var.name}-media-rtmp"
  description             = "RTMP publish and play on media nodes"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_ranges           = var.rtmp_ingress_cidrs
  target_service_accounts = [google_service_account.node.email]

  allow {
    protocol = "tcp"
    ports    = [var.rtmp_port]
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "media_agent" {
  project                 = var.project_id
  name                    = "${var.name}-media-agent"
  description             = "node agent HTTP from inside the cluster"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_service_accounts = [google_service_account.api.email, google_service_account.controller.email, google_service_account.node.email]
  target_service_accounts = [google_service_account.node.email]

  allow {
    protocol = "tcp"
    ports    = [var.agent_http_port]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "iap_ssh" {
  count                   = var.allow_iap_ssh ? 1 : 0
  project                 = var.project_id
  name                    = "${var.name}-iap-ssh"
  description             = "SSH through Identity-Aware Proxy only (OS Login decides who)"
  network                 = google_compute_network.this.id
  direction               = "INGRESS"
  source_ranges           = ["35.235.240.0/20"]
  target_service_accounts = values(local.service_accounts)

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

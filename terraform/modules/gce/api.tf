# API servers: a regional managed instance group in the home region behind a global external Application
# Load Balancer. HTTPS (Google-managed certificate) ends at the load balancer; it forwards plain HTTP to
# port var.api_port and health-checks /healthz (503 until the server's registry view is initialised).
# The instance template is google_compute_instance_template.control_plane["api"] (control_plane.tf).

resource "google_compute_health_check" "api" {
  project             = var.project_id
  name                = "${var.name}-api"
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3

  http_health_check {
    port         = var.api_port
    request_path = "/healthz"
  }

  log_config {
    enable = true
  }
}

resource "google_compute_region_instance_group_manager" "api" {
  project            = var.project_id
  name               = "${var.name}-api"
  region             = var.home_region
  base_instance_name = "${var.name}-api"
  target_size        = var.api_server_count

  version {
    instance_template = google_compute_instance_template.control_plane["api"].id
  }

  named_port {
    name = "http"
    port = var.api_port
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.api.id
    initial_delay_sec = 300
  }

  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    max_surge_fixed       = length(data.google_compute_zones.home.names)
    max_unavailable_fixed = 0
  }

  depends_on = [google_compute_instance.zookeeper, google_compute_router_nat.home]
}

# -- load balancer -------------------------------------------------------------------------------------

# Prometheus metrics stay inside the network (scrape the servers on var.api_port).
resource "google_compute_security_policy" "api" {
  #checkov:skip=CKV_GCP_73:the Log4j rule guards Java backends; the API servers are Python (gunicorn)
  project     = var.project_id
  name        = "${var.name}-api"
  description = "streammanager ${var.name}: keep /metrics private"

  rule {
    action      = "deny(404)"
    priority    = 1000
    description = "metrics are scraped inside the network"
    match {
      expr {
        expression = "request.path.startsWith('/metrics')"
      }
    }
  }

  rule {
    action      = "allow"
    priority    = 2147483647
    description = "everything else"
    match {
      versioned_expr = "SRC_IPS_V1"
      config {
        src_ip_ranges = ["*"]
      }
    }
  }
}

resource "google_compute_backend_service" "api" {
  project                         = var.project_id
  name                            = "${var.name}-api"
  load_balancing_scheme           = "EXTERNAL_MANAGED"
  protocol                        = "HTTP"
  port_name                       = "http"
  timeout_sec                     = 30
  connection_draining_timeout_sec = 15
  health_checks                   = [google_compute_health_check.api.id]
  security_policy                 = google_compute_security_policy.api.id

  backend {
    group           = google_compute_region_instance_group_manager.api.instance_group
    balancing_mode  = "UTILIZATION"
    capacity_scaler = 1.0
  }

  log_config {
    enable      = true
    sample_rate = 1.0
  }
}

resource "google_compute_url_map" "api" {
  project         = var.project_id
  name            = "${var.name}-api"
  default_service = google_compute_backend_service.api.id
}

resource "google_compute_managed_ssl_certificate" "api" {
  project = var.project_id
  name    = "${var.name}-api"

  managed {
    domains = var.api_domains
  }
}

resource "google_compute_ssl_policy" "api" {
  project         = var.project_id
  name            = "${var.name}-api"
  profile         = "MODERN"
  min_tls_version = "TLS_1_2"
}

resource "google_compute_target_https_proxy" "api" {
  project          = var.project_id
  name             = "${var.name}-api"
  url_map          = google_compute_url_map.api.id
  ssl_certificates = [google_compute_managed_ssl_certificate.api.id]
  ssl_policy       = google_compute_ssl_policy.api.id
}

resource "google_compute_global_address" "api" {
  project = var.project_id
  name    = "${var.name}-api"
}

resource "google_compute_global_forwarding_rule" "api" {
  project               = var.project_id
  name                  = "${var.name}-api-https"
  target                = google_compute_target_https_proxy.api.id
  ip_address            = google_compute_global_address.api.id
  ip_protocol           = "TCP"
  port_range            = "443"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  labels                = local.labels
}

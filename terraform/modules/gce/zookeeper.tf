# The ZooKeeper ensemble: one instance per member, spread over the home region's zones, on reserved
# internal addresses, without external addresses. Members are replaced one at a time by hand
# (terraform apply -replace=...), never all together: image and startup-script changes are ignored
# once a member exists.

data "google_compute_zones" "home" {
  project = var.project_id
  region  = var.home_region
  status  = "UP"

  depends_on = [google_project_service.this]
}

resource "google_compute_address" "zookeeper" {
  count        = var.zookeeper_count
  project      = var.project_id
  name         = "${var.name}-zookeeper-${count.index + 1}"
  region       = var.home_region
  subnetwork   = google_compute_subnetwork.this[var.home_region].id
  address_type = "INTERNAL"
  address      = local.zookeeper_ips[count.index]
}

resource "google_compute_instance" "zookeeper" {
  #checkov:skip=CKV_GCP_38:disks use Google-managed encryption; customer-supplied keys would have to be handed to every restart
  count        = var.zookeeper_count
  project      = var.project_id
  name         = "${var.name}-zookeeper-${count.index + 1}"
  zone         = data.google_compute_zones.home.names[count.index % length(data.google_compute_zones.home.names)]
  machine_type = var.zookeeper_machine_type
  labels       = merge(local.labels, { "streammanager-role" = "zookeeper" })

  allow_stopping_for_update = true

  boot_disk {
    initialize_params {
      image = var.image
      size  = var.zookeeper_disk_gb
      type  = "pd-balanced"
    }
  }

  network_interface {
    subnetwork = google_compute_subnetwork.this[var.home_region].id
    network_ip = google_compute_address.zookeeper[count.index].address
    # no access_config: no external address
  }

  service_account {
    email  = google_service_account.zookeeper.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
    startup-script = templatefile("${path.module}/templates/zookeeper.sh.tftpl", {
      cluster_id = var.name
      myid       = count.index + 1
      private_ip = local.zookeeper_ips[count.index]
      member_ips = local.zookeeper_ips
    })
  }

  lifecycle {
    ignore_changes = [boot_disk[0].initialize_params[0].image, metadata["startup-script"]]
  }

  depends_on = [google_compute_router_nat.home]
}

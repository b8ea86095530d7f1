# Controllers: a regional managed instance group of fixed size (replaces a dead controller) without
# external addresses. They need no inbound port; they reach ZooKeeper, the Compute API (through Cloud NAT
# or Private Google Access) and the agents.

resource "google_compute_instance_template" "controller" {
  project      = var.project_id
  name_prefix  = "${var.name}-controller-"
  description  = "streammanager ${var.name} controller"
  machine_type = var.controller_machine_type
  region       = var.home_region
  labels       = merge(local.labels, { "streammanager-role" = "controller" })

  disk {
    source_image = var.image
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = 16
  }

  network_interface {
    subnetwork = google_compute_subnetwork.this[var.home_region].id
    # no access_config: no external address
  }

  service_account {
    email  = google_service_account.controller.email
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
    startup-script = templatefile("${path.module}/templates/controller.sh.tftpl", {
      cluster_id            = var.name
      install_streammanager = local.install_streammanager
      project_id            = var.project_id
      zk_hosts              = local.zk_hosts
      zk_root               = var.zk_root
      package_spec          = var.package_spec
      service_account       = google_service_account.controller.email
    })
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_region_instance_group_manager" "controller" {
  project            = var.project_id
  name               = "${var.name}-controller"
  region             = var.home_region
  base_instance_name = "${var.name}-controller"
  target_size        = var.controller_count

  version {
    instance_template = google_compute_instance_template.controller.id
  }

  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    max_surge_fixed       = length(data.google_compute_zones.home.names)
    max_unavailable_fixed = 0
  }

  depends_on = [google_compute_instance.zookeeper, google_compute_router_nat.home]
}

# The control plane's instance templates (API servers and controllers): the same hardened instance, each
# with its own machine type, service account and startup script.

locals {
  control_plane = {
    api = {
      description     = "API server"
      machine_type    = var.api_machine_type
      service_account = google_service_account.api.email
      startup_script = templatefile("${path.module}/templates/api-server.sh.tftpl", {
        cluster_id            = var.name
        install_streammanager = local.install_streammanager
        access_token_secret   = google_secret_manager_secret.access_token.id
        zk_auth_secret        = google_secret_manager_secret.zk_auth.id
        zk_hosts              = local.zk_hosts
        zk_root               = var.zk_root
        api_port              = var.api_port
      })
    }
    controller = {
      description     = "controller"
      machine_type    = var.controller_machine_type
      service_account = google_service_account.controller.email
      startup_script = templatefile("${path.module}/templates/controller.sh.tftpl", {
        cluster_id            = var.name
        install_streammanager = local.install_streammanager
        project_id            = var.project_id
        zk_auth_secret        = google_secret_manager_secret.zk_auth.id
        zk_hosts              = local.zk_hosts
        zk_root               = var.zk_root
        package_spec          = var.package_spec
        service_account       = google_service_account.controller.email
      })
    }
  }
}

resource "google_compute_instance_template" "control_plane" {
  for_each     = local.control_plane
  project      = var.project_id
  name_prefix  = "${var.name}-${each.key}-"
  description  = "streammanager ${var.name} ${each.value.description}"
  machine_type = each.value.machine_type
  region       = var.home_region
  labels       = merge(local.labels, { "streammanager-role" = each.key })

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
    email  = each.value.service_account
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
    startup-script         = each.value.startup_script
  }

  lifecycle {
    create_before_destroy = true
  }
}

# Controllers: a regional managed instance group of fixed size (replaces a dead controller) without
# external addresses. They need no inbound port; they reach ZooKeeper, the Compute API (through Cloud NAT
# or Private Google Access) and the agents.
# The instance template is google_compute_instance_template.control_plane["controller"] (control_plane.tf).

resource "google_compute_region_instance_group_manager" "controller" {
  project            = var.project_id
  name               = "${var.name}-controller"
  region             = var.home_region
  base_instance_name = "${var.name}-controller"
  target_size        = var.controller_count

  version {
    instance_template = google_compute_instance_template.control_plane["controller"].id
  }

  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    max_surge_fixed       = length(data.google_compute_zones.home.names)
    max_unavailable_fixed = 0
  }

  depends_on = [google_compute_instance.zookeeper, google_compute_router_nat.home]
}

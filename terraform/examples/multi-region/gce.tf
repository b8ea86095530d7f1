provider "google" {
  project = var.gce_project_id
}

module "gce" {
  source = "../../modules/gce"

  project_id   = var.gce_project_id
  name         = var.gce_cluster_name
  package_spec = var.streammanager_package
  home_region  = var.gce_home_region
  subnet_cidrs = {
    (var.gce_home_region)  = "10.50.0.0/20"
    (var.gce_media_region) = "10.51.0.0/20"
  }
  api_domains = var.gce_api_domains
  labels      = local.labels
}

output "cluster_id" {
  description = "The cluster id: the sm-cluster label of the media nodes the controller launches (SM_CLUSTER_ID)."
  value       = var.name
}

output "api_address" {
  description = "External IP address of the API load balancer: point every name of api_domains at it (the managed certificate is issued once they resolve)."
  value       = google_compute_global_address.api.address
}

output "api_url" {
  description = "Base URL of the API through the load balancer."
  value       = "https://${var.api_domains[0]}/streammanager/api/2.0"
}

output "zk_hosts" {
  description = "ZooKeeper connection string (SM_ZK_HOSTS / AGENT_ZK_HOSTS): internal addresses of the ensemble."
  value       = local.zk_hosts
}

output "zk_root" {
  description = "Root znode of the cluster (SM_ZK_ROOT / AGENT_ZK_ROOT)."
  value       = var.zk_root
}

output "access_token_secret" {
  description = "Secret Manager secret holding SM_ACCESS_TOKEN (gcloud secrets versions access latest --secret=...)."
  value       = google_secret_manager_secret.access_token.id
}

output "zk_auth_secret" {
  description = "Secret Manager secret holding SM_ZK_AUTH, the cluster's ZooKeeper digest identity USER:PASSWORD (for your own ZooKeeper clients: zkCli.sh addauth digest USER:PASSWORD)."
  value       = google_secret_manager_secret.zk_auth.id
}

output "controller_service_account" {
  description = "Service account of the controllers."
  value       = google_service_account.controller.email
}

output "node_service_account" {
  description = "Service account the controller runs media nodes as (launchConfig.placement.<region>.serviceAccount)."
  value       = google_service_account.node.email
}

output "node_subnetworks" {
  description = "Self link of each region's subnetwork, by region (launchConfig.placement.<region>.subnetwork)."
  value       = { for region, subnet in google_compute_subnetwork.this : region => subnet.self_link }
}

output "network" {
  description = "Self link of the cluster's VPC network."
  value       = google_compute_network.this.self_link
}

output "node_boot_script_template" {
  description = "Boot script template of the media nodes: put it in each node group's launchConfig.bootScript (the controller fills its placeholders)."
  value       = local.node_boot_script_template
}

output "node_launch" {
  description = "How the controller launches media nodes, per region: a node group's launchConfig.provider and .image, and `placement`, the region's launchConfig.placement entry (its keys are the API's)."
  value = {
    for region, subnet in google_compute_subnetwork.this : region => {
      provider = "gce"
      project  = var.project_id
      region   = region
      image    = startswith(var.image, "https://") ? var.image : "https://www.googleapis.com/compute/v1/${var.image}"
      placement = {
        network        = google_compute_network.this.self_link
        subnetwork     = subnet.self_link
        serviceAccount = google_service_account.node.email
        scopes         = ["https://www.googleapis.com/auth/cloud-platform"]
        publicIp       = true
      }
    }
  }
}

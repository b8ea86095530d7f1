output "aws_api_url" {
  description = "API of the AWS cluster (through its load balancer)."
  value       = module.aws_home.api_url
}

output "aws_api_load_balancer_dns_name" {
  description = "Point the AWS API's DNS name (the certificate's) at this."
  value       = module.aws_home.api_load_balancer_dns_name
}

output "aws_zk_hosts" {
  description = "ZooKeeper connection string of the AWS cluster."
  value       = module.aws_home.zk_hosts
}

output "aws_access_token_secret_arn" {
  description = "Secret holding the AWS cluster's admin token."
  value       = module.aws_home.access_token_secret_arn
}

output "aws_zk_auth_secret_arn" {
  description = "Secret holding the AWS cluster's ZooKeeper identity (SM_ZK_AUTH)."
  value       = module.aws_home.zk_auth_secret_arn
}

output "aws_node_launch" {
  description = "launchConfig values for AWS node groups, per region (image and placement)."
  value = {
    (var.aws_home_region)  = module.aws_home.node_launch
    (var.aws_media_region) = module.aws_media.node_launch
  }
}

output "aws_node_placement" {
  description = "launchConfig.placement entry of each AWS region, as the API takes it (terraform output -json aws_node_placement); one node group per region, as an AMI id belongs to one region."
  value = {
    (var.aws_home_region)  = module.aws_home.node_launch.placement
    (var.aws_media_region) = module.aws_media.node_launch.placement
  }
}

output "gce_api_url" {
  description = "API of the GCE cluster (once its names point at gce_api_address)."
  value       = module.gce.api_url
}

output "gce_api_address" {
  description = "Point the GCE API's DNS names at this address."
  value       = module.gce.api_address
}

output "gce_zk_hosts" {
  description = "ZooKeeper connection string of the GCE cluster."
  value       = module.gce.zk_hosts
}

output "gce_access_token_secret" {
  description = "Secret holding the GCE cluster's admin token."
  value       = module.gce.access_token_secret
}

output "gce_zk_auth_secret" {
  description = "Secret holding the GCE cluster's ZooKeeper identity (SM_ZK_AUTH)."
  value       = module.gce.zk_auth_secret
}

output "gce_node_launch" {
  description = "launchConfig values for GCE node groups, per region (image and placement)."
  value       = module.gce.node_launch
}

output "gce_node_placement" {
  description = "launchConfig.placement of a GCE node group spanning every region of the cluster, as the API takes it (terraform output -json gce_node_placement)."
  value       = { for region, launch in module.gce.node_launch : region => launch.placement }
}

output "cluster_id" {
  description = "The cluster id: the sm-cluster tag of the media nodes the controller launches (SM_CLUSTER_ID)."
  value       = var.name
}

output "api_url" {
  description = "Base URL of the API through the load balancer; point a DNS name of the certificate at api_load_balancer_dns_name."
  value       = "https://${aws_lb.api.dns_name}/streammanager/api/2.0"
}

output "api_load_balancer_dns_name" {
  description = "DNS name of the API load balancer (CNAME or alias target for the API's name)."
  value       = aws_lb.api.dns_name
}

output "api_load_balancer_zone_id" {
  description = "Route 53 hosted zone id of the load balancer, for an alias record."
  value       = aws_lb.api.zone_id
}

output "zk_hosts" {
  description = "ZooKeeper connection string (SM_ZK_HOSTS / AGENT_ZK_HOSTS): private addresses of the ensemble."
  value       = local.zk_hosts
}

output "zk_root" {
  description = "Root znode of the cluster (SM_ZK_ROOT / AGENT_ZK_ROOT)."
  value       = var.zk_root
}

output "access_token_secret_arn" {
  description = "Secrets Manager secret holding SM_ACCESS_TOKEN (read it with aws secretsmanager get-secret-value)."
  value       = aws_secretsmanager_secret.access_token.arn
}

output "zk_auth_secret_arn" {
  description = "Secrets Manager secret holding SM_ZK_AUTH, the cluster's ZooKeeper digest identity USER:PASSWORD (for your own ZooKeeper clients: zkCli.sh addauth digest USER:PASSWORD)."
  value       = aws_secretsmanager_secret.zk_auth.arn
}

output "controller_role_arn" {
  description = "IAM role of the controllers."
  value       = aws_iam_role.controller.arn
}

output "node_instance_profile" {
  description = "Instance profile the controller gives the media nodes it launches (launchConfig.placement.<region>.instanceProfile)."
  value       = aws_iam_instance_profile.node.name
}

output "node_subnet_ids" {
  description = "Public subnets of the home region's media nodes, one per zone (launchConfig.placement.<region>.subnets)."
  value       = aws_subnet.public[*].id
}

output "node_security_group_ids" {
  description = "Security group of the home region's media nodes (launchConfig.placement.<region>.securityGroups)."
  value       = [aws_security_group.media.id]
}

output "node_boot_script_template" {
  description = "Boot script template of the media nodes: put it in each node group's launchConfig.bootScript (the controller fills its placeholders)."
  value       = local.node_boot_script_template
}

output "node_launch" {
  description = "How the controller launches media nodes in the home region: a node group's launchConfig.provider and .image, and `placement`, the region's launchConfig.placement entry (its keys are the API's)."
  value = {
    provider = "ec2"
    region   = local.region
    image    = local.image_id
    placement = {
      subnets         = aws_subnet.public[*].id
      securityGroups  = [aws_security_group.media.id]
      instanceProfile = aws_iam_instance_profile.node.name
      publicIp        = true
    }
  }
}

output "vpc_id" {
  description = "Id of the home VPC."
  value       = aws_vpc.this.id
}

output "zookeeper_private_ips" {
  description = "Private addresses of the ZooKeeper members, in myid order."
  value       = local.zookeeper_ips
}

output "home" {
  description = "What a media-region module needs to know about the home region; pass it as its `home` variable."
  value = {
    cluster_id                  = var.name
    region                      = local.region
    vpc_id                      = aws_vpc.this.id
    vpc_cidr                    = aws_vpc.this.cidr_block
    route_table_ids             = concat([aws_route_table.public.id], aws_route_table.private[*].id)
    zookeeper_security_group_id = aws_security_group.zookeeper.id
    node_instance_profile       = aws_iam_instance_profile.node.name
    flow_logs_role_arn          = aws_iam_role.flow_logs.arn
    agent_http_port             = var.agent_http_port
    rtmp_port                   = var.rtmp_port
    tags                        = local.tags
  }
}

output "region" {
  description = "The media region."
  value       = local.region
}

output "vpc_id" {
  description = "Id of this region's media VPC."
  value       = aws_vpc.this.id
}

output "peering_connection_id" {
  description = "Id of the peering between this VPC and the home VPC."
  value       = aws_vpc_peering_connection.home.id
}

output "node_launch" {
  description = "How the controller launches media nodes in this region: a node group's launchConfig.provider and .image (this region's AMI), and `placement`, the region's launchConfig.placement entry (its keys are the API's)."
  value = {
    provider = "ec2"
    region   = local.region
    image    = data.aws_ami.selected.id
    placement = {
      subnets         = aws_subnet.media[*].id
      securityGroups  = [aws_security_group.media.id]
      instanceProfile = var.home.node_instance_profile
      publicIp        = true
    }
  }
}

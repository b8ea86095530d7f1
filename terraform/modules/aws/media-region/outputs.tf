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
  description = "Where the controller launches media nodes in this region: values for a node group's launchConfig."
  value = {
    provider           = "ec2"
    region             = local.region
    image              = data.aws_ami.selected.id
    subnet_ids         = aws_subnet.media[*].id
    security_group_ids = [aws_security_group.media.id]
    instance_profile   = var.home.node_instance_profile
    assign_public_ip   = true
  }
}

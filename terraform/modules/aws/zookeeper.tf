# The ZooKeeper ensemble: one instance per member, spread over the zones, on fixed private addresses.
# Members are replaced one at a time by hand (terraform apply -replace=...), never all together: image and
# boot script changes are ignored once a member exists.

resource "aws_instance" "zookeeper" {
  count = var.zookeeper_count

  ami                         = local.image_id
  instance_type               = var.zookeeper_instance_type
  subnet_id                   = aws_subnet.private[count.index % var.availability_zone_count].id
  private_ip                  = local.zookeeper_ips[count.index]
  vpc_security_group_ids      = [aws_security_group.zookeeper.id]
  iam_instance_profile        = aws_iam_instance_profile.zookeeper.name
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = true

  user_data = templatefile("${path.module}/templates/zookeeper.sh.tftpl", {
    cluster_id = var.name
    myid       = count.index + 1
    private_ip = local.zookeeper_ips[count.index]
    member_ips = local.zookeeper_ips
  })

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.zookeeper_disk_gb
    encrypted             = true
    delete_on_termination = true
  }

  tags        = merge(local.tags, { Name = "${var.name}-zookeeper-${count.index + 1}", "streammanager-role" = "zookeeper" })
  volume_tags = merge(local.tags, { Name = "${var.name}-zookeeper-${count.index + 1}" })

  lifecycle {
    ignore_changes = [ami, user_data]
  }
}

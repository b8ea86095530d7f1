# Controllers: a fixed-size Auto Scaling group (replaces a dead controller) in the private subnets. They
# need no inbound port; they reach ZooKeeper, the EC2 API (through NAT) and the agents.

resource "aws_launch_template" "controller" {
  name_prefix            = "${var.name}-controller-"
  description            = "streammanager ${var.name} controller"
  image_id               = local.image_id
  instance_type          = var.controller_instance_type
  ebs_optimized          = true
  update_default_version = true

  user_data = base64encode(templatefile("${path.module}/templates/controller.sh.tftpl", {
    cluster_id            = var.name
    install_streammanager = local.install_streammanager
    region                = local.region
    zk_hosts              = local.zk_hosts
    zk_root               = var.zk_root
    package_spec          = var.package_spec
  }))

  iam_instance_profile {
    name = aws_iam_instance_profile.controller.name
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.controller.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = local.root_device_name
    ebs {
      volume_type           = "gp3"
      volume_size           = 16
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${var.name}-controller", "streammanager-role" = "controller" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${var.name}-controller" })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "controller" {
  name_prefix               = "${var.name}-controller-"
  min_size                  = var.controller_count
  desired_capacity          = var.controller_count
  max_size                  = var.controller_count
  vpc_zone_identifier       = aws_subnet.private[*].id
  health_check_type         = "EC2"
  health_check_grace_period = 120

  launch_template {
    id      = aws_launch_template.controller.id
    version = aws_launch_template.controller.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = local.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false # instances get their tags from the launch template
    }
  }

  depends_on = [aws_instance.zookeeper]
}

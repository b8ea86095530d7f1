# Controllers: a fixed-size Auto Scaling group (replaces a dead controller) in the private subnets. They
# need no inbound port; they reach ZooKeeper, the EC2 API (through NAT) and the agents.

resource "aws_autoscaling_group" "controller" {
  name_prefix               = "${var.name}-controller-"
  min_size                  = var.controller_count
  desired_capacity          = var.controller_count
  max_size                  = var.controller_count
  vpc_zone_identifier       = aws_subnet.private[*].id
  health_check_type         = "EC2"
  health_check_grace_period = 120

  launch_template {
    id      = aws_launch_template.control_plane["controller"].id
    version = aws_launch_template.control_plane["controller"].latest_version
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

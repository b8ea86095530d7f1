# The control plane's launch templates (API servers and controllers): the same hardened instance, each
# with its own user data, instance profile and security group.

locals {
  control_plane = {
    api = {
      description   = "API server"
      instance_type = var.api_instance_type
      user_data = templatefile("${path.module}/templates/api-server.sh.tftpl", {
        cluster_id              = var.name
        install_streammanager   = local.install_streammanager
        region                  = local.region
        access_token_secret_arn = aws_secretsmanager_secret.access_token.arn
        zk_auth_secret_arn      = aws_secretsmanager_secret.zk_auth.arn
        zk_hosts                = local.zk_hosts
        zk_root                 = var.zk_root
        api_port                = var.api_port
      })
      instance_profile = aws_iam_instance_profile.api.name
      security_group   = aws_security_group.api.id
    }
    controller = {
      description   = "controller"
      instance_type = var.controller_instance_type
      user_data = templatefile("${path.module}/templates/controller.sh.tftpl", {
        cluster_id            = var.name
        install_streammanager = local.install_streammanager
        region                = local.region
        zk_auth_secret_arn    = aws_secretsmanager_secret.zk_auth.arn
        zk_hosts              = local.zk_hosts
        zk_root               = var.zk_root
        package_spec          = var.package_spec
      })
      instance_profile = aws_iam_instance_profile.controller.name
      security_group   = aws_security_group.controller.id
    }
  }
}

resource "aws_launch_template" "control_plane" {
  for_each               = local.control_plane
  name_prefix            = "${var.name}-${each.key}-"
  description            = "streammanager ${var.name} ${each.value.description}"
  image_id               = local.image_id
  instance_type          = each.value.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(each.value.user_data)

  iam_instance_profile {
    name = each.value.instance_profile
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [each.value.security_group]
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
    tags          = merge(local.tags, { Name = "${var.name}-${each.key}", "streammanager-role" = each.key })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${var.name}-${each.key}" })
  }

  tags = local.tags
}

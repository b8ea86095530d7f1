# API servers: an Auto Scaling group in the private subnets behind an internet-facing ALB. HTTPS ends at
# the ALB; it forwards plain HTTP to port var.api_port and health-checks /healthz (503 until the
# server's registry view is initialised).

resource "aws_autoscaling_group" "api" {
  name_prefix               = "${var.name}-api-"
  min_size                  = var.api_server_count
  desired_capacity          = var.api_server_count
  max_size                  = max(var.api_server_max_count, var.api_server_count)
  vpc_zone_identifier       = aws_subnet.private[*].id
  target_group_arns         = [aws_lb_target_group.api.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 300

  launch_template {
    id      = aws_launch_template.control_plane["api"].id
    version = aws_launch_template.control_plane["api"].latest_version
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

# -- load balancer -------------------------------------------------------------------------------------

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_76:no WAF web ACL is attached by default (see CKV2_AWS_28); the API servers are Python, not Log4j
  #checkov:skip=CKV2_AWS_28:a WAF web ACL is optional (var.waf_web_acl_arn); the API answers lookups only and refuses admin calls without the token
  #checkov:skip=CKV_AWS_91:access logs need an operator-owned S3 bucket with an ELB delivery policy: set var.alb_access_logs_bucket
  name                       = "${var.name}-api"
  load_balancer_type         = "application"
  internal                   = false
  security_groups            = [aws_security_group.alb.id]
  subnets                    = aws_subnet.public[*].id
  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection
  idle_timeout               = 60

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket == null ? [] : [var.alb_access_logs_bucket]
    content {
      enabled = true
      bucket  = access_logs.value
      prefix  = "streammanager/${var.name}"
    }
  }

  tags = merge(local.tags, { Name = "${var.name}-api" })
}

resource "aws_wafv2_web_acl_association" "api" {
  count        = var.waf_web_acl_arn == null ? 0 : 1
  resource_arn = aws_lb.api.arn
  web_acl_arn  = var.waf_web_acl_arn
}

resource "aws_lb_target_group" "api" {
  #checkov:skip=CKV_AWS_378:TLS ends at the load balancer; gunicorn serves plain HTTP inside the VPC, reachable from the ALB's security group only
  name                 = "${var.name}-api"
  port                 = var.api_port
  protocol             = "HTTP"
  target_type          = "instance"
  vpc_id               = aws_vpc.this.id
  deregistration_delay = 15

  health_check {
    path                = "/healthz"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }

  tags = local.tags
}

# Prometheus metrics stay inside the VPC: scrape the servers directly on var.api_port.
resource "aws_lb_listener_rule" "hide_metrics" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 10

  action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      status_code  = "404"
      message_body = "{\"errorMessage\": \"not found\"}"
    }
  }

  condition {
    path_pattern {
      values = ["/metrics", "/metrics/*"]
    }
  }

  tags = local.tags
}

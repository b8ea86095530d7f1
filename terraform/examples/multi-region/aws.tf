provider "aws" {
  region = var.aws_home_region
}

provider "aws" {
  alias  = "media"
  region = var.aws_media_region
}

module "aws_home" {
  source = "../../modules/aws"

  name            = var.aws_cluster_name
  package_spec    = var.streammanager_package
  certificate_arn = var.aws_api_certificate_arn
  vpc_cidr        = "10.40.0.0/16"
  media_regions   = [var.aws_media_region]
  tags            = local.labels
}

module "aws_media" {
  source = "../../modules/aws/media-region"
  providers = {
    aws      = aws.media
    aws.home = aws
  }

  home     = module.aws_home.home
  vpc_cidr = "10.41.0.0/16"
}

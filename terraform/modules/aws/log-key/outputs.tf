output "arn" {
  description = "ARN of the key (kms_key_id of log groups and secrets)."
  value       = aws_kms_key.this.arn
}

output "key_id" {
  description = "Id of the key (for an alias)."
  value       = aws_kms_key.this.key_id
}

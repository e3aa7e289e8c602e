"""pretrain configs."""

"""Writer side: synthetic Cityscapes generator, shard packer and shard checks."""

"""Model folders on disk, split by job: `read` (Checkpoint, header/config validation, side files, the pickle
policy), `write` (sharded safetensors, side files copied into an output, shard sizes) and `hashing` (content
hashes of files and model folders, and their cache).

Nothing is imported here: `hashing` is used where torch must not be imported (the registry, the gateway).
"""

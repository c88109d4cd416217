//! In-process lock sharding by key.

/// The lock shard of `key` among `shards`: a fixed hasher, so the choice is spread evenly
/// and the same on every call (in-process sharding only; never persisted).
pub fn shard_of(key: &str, shards: usize) -> usize {
    use std::hash::BuildHasher;
    let h = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(key);
    (h as usize) % shards
}

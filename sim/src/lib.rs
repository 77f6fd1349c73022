//! vllm-sim (being written).

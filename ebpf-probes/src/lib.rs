//! eBPF probes (C, CO-RE, loaded with aya) that classify processes as CPU-bound or I/O-bound for migd.
//!
//! Nothing is implemented yet.

//! Image transfer. (being written)

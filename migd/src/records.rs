//! Home records. (being written)

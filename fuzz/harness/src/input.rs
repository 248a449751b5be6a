//! Structure read from plain fuzz bytes, and its writer for seeds.
//!
//! The structured targets (a channel script, an image set with tamperings) take their choices from the
//! input one field at a time. An input that runs out reads as zeros and empty slices, so every byte
//! string is a valid input and a truncated one still means something close to the original; libFuzzer's
//! byte mutations then change one choice at a time.

/// A cursor over a fuzz input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// True when nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        let Some((&first, rest)) = self.data.split_first() else { return 0 };
        self.data = rest;
        first
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next `len` bytes, or fewer if the input ends first.
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken
    }

    /// A length-prefixed byte string (u16 length, at most `max`).
    pub fn chunk(&mut self, max: usize) -> &'a [u8] {
        let len = usize::from(self.u16()) % (max + 1);
        self.bytes(len)
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Writes the fields [`Input`] reads, to build seeds.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    bytes: Vec<u8>,
}

impl Builder {
    /// An empty input.
    pub fn new() -> Self {
        Self::default()
    }

    /// One byte.
    #[must_use]
    pub fn u8(mut self, value: u8) -> Self {
        self.bytes.push(value);
        self
    }

    /// Two bytes, little-endian.
    #[must_use]
    pub fn u16(mut self, value: u16) -> Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Four bytes, little-endian.
    #[must_use]
    pub fn u32(mut self, value: u32) -> Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Raw bytes.
    #[must_use]
    pub fn bytes(mut self, value: &[u8]) -> Self {
        self.bytes.extend_from_slice(value);
        self
    }

    /// A length-prefixed byte string, as [`Input::chunk`] reads it.
    #[must_use]
    pub fn chunk(self, value: &[u8]) -> Self {
        let len = u16::try_from(value.len()).expect("seed chunks are short");
        self.u16(len).bytes(value)
    }

    /// The input.
    pub fn build(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_as_written_and_zeros_past_the_end() {
        let data = Builder::new().u8(7).u16(0x1234).u32(0xdead_beef).chunk(b"abc").bytes(b"xy").build();
        let mut input = Input::new(&data);
        assert_eq!(input.u8(), 7);
        assert_eq!(input.u16(), 0x1234);
        assert_eq!(input.u32(), 0xdead_beef);
        assert_eq!(input.chunk(100), b"abc");
        assert_eq!(input.bytes(5), b"xy");
        assert!(input.is_empty());
        assert_eq!(input.u32(), 0);
        assert_eq!(input.chunk(10), b"");
    }

    #[test]
    fn a_chunk_is_cut_to_its_bound() {
        let data = Builder::new().chunk(b"abcdef").build();
        // Length 6 modulo (3 + 1) is 2.
        assert_eq!(Input::new(&data).chunk(3), b"ab");
    }
}

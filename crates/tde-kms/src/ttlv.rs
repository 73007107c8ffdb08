//! KMIP's TTLV encoding (tag, type, length, value), the little the `kmip`
//! provider needs of it.
//!
//! Why our own codec: the KMIP crates on crates.io either lack Encrypt and
//! Decrypt (`kmip-protocol` 0.4, which also pins rustls 0.19 and webpki
//! 0.21) or are not open source (`cosmian_kmip`, BUSL-1.1).  TTLV itself is
//! small: every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian
//! length and the value, padded with zeros to a multiple of 8 bytes
//! (KMIP 1.4, section 9.1).
//!
//! Byte strings are held in zeroizing buffers: they carry the KEK in an
//! Encrypt request and in a Decrypt response.

use zeroize::Zeroizing;

/// Deepest nesting accepted when decoding (KMIP messages use about 6).
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Type {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
}

pub(crate) enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    BigInteger(Vec<u8>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Zeroizing<Vec<u8>>),
    DateTime(i64),
    Interval(u32),
}

pub(crate) struct Item {
    pub tag: u32,
    pub value: Value,
}

impl Item {
    pub fn structure(tag: u32, items: Vec<Item>) -> Item {
        Item { tag, value: Value::Structure(items) }
    }
    pub fn integer(tag: u32, v: i32) -> Item {
        Item { tag, value: Value::Integer(v) }
    }
    pub fn enumeration(tag: u32, v: u32) -> Item {
        Item { tag, value: Value::Enumeration(v) }
    }
    pub fn text(tag: u32, v: &str) -> Item {
        Item { tag, value: Value::TextString(v.to_string()) }
    }
    pub fn bytes(tag: u32, v: &[u8]) -> Item {
        Item { tag, value: Value::ByteString(Zeroizing::new(v.to_vec())) }
    }

    /// The children of a structure (none for any other type).
    pub fn items(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// The first child with `tag`.
    pub fn find(&self, tag: u32) -> Option<&Item> {
        self.items().iter().find(|i| i.tag == tag)
    }

    /// All children with `tag`.
    pub fn find_all(&self, tag: u32) -> impl Iterator<Item = &Item> {
        self.items().iter().filter(move |i| i.tag == tag)
    }

    /// The first child with `tag`, taken out of `self`.
    pub fn take(self, tag: u32) -> Option<Item> {
        match self.value {
            Value::Structure(items) => items.into_iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    pub fn as_enum(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::TextString(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::ByteString(b) => Some(b),
            _ => None,
        }
    }

    /// Appends the encoding of `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        let (ty, start) = (self.type_byte(), out.len());
        out.push(ty as u8);
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        match &self.value {
            Value::Structure(items) => items.iter().for_each(|i| i.encode(out)),
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::BigInteger(v) => out.extend_from_slice(v),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
            Value::ByteString(b) => out.extend_from_slice(b),
        }
        let len = (out.len() - body) as u32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        out.resize(out.len() + pad(len as usize), 0);
    }

    fn type_byte(&self) -> Type {
        match self.value {
            Value::Structure(_) => Type::Structure,
            Value::Integer(_) => Type::Integer,
            Value::LongInteger(_) => Type::LongInteger,
            Value::BigInteger(_) => Type::BigInteger,
            Value::Enumeration(_) => Type::Enumeration,
            Value::Boolean(_) => Type::Boolean,
            Value::TextString(_) => Type::TextString,
            Value::ByteString(_) => Type::ByteString,
            Value::DateTime(_) => Type::DateTime,
            Value::Interval(_) => Type::Interval,
        }
    }

    /// Decodes exactly one item filling all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Item, String> {
        let (item, used) = decode_at(buf, 0)?;
        if used != buf.len() {
            return Err(format!("{} bytes after the message", buf.len() - used));
        }
        Ok(item)
    }
}

/// Padding after a value of `len` bytes.
fn pad(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// The length of the whole item whose 8-byte header is `header`.
pub(crate) fn message_len(header: &[u8; 8]) -> usize {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    8 + len + pad(len)
}

fn decode_at(buf: &[u8], depth: usize) -> Result<(Item, usize), String> {
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    if buf.len() < 8 {
        return Err("truncated item header".into());
    }
    let tag = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    let padded = len.checked_add(pad(len)).ok_or("length overflows")?;
    let body = buf.get(8..8 + padded).ok_or_else(|| format!("item {tag:06X} is truncated"))?;
    let (v, rest) = body.split_at(len);
    if rest.iter().any(|&b| b != 0) {
        return Err(format!("item {tag:06X} has non-zero padding"));
    }
    let fixed = |n: usize| -> Result<(), String> {
        if len == n {
            Ok(())
        } else {
            Err(format!("item {tag:06X} has length {len}, expected {n}"))
        }
    };
    let value = match buf[3] {
        0x01 => {
            if !len.is_multiple_of(8) {
                return Err(format!("structure {tag:06X} has length {len}, not a multiple of 8"));
            }
            let mut items = Vec::new();
            let mut at = 0;
            while at < len {
                let (item, used) = decode_at(&v[at..], depth + 1)?;
                items.push(item);
                at += used;
            }
            Value::Structure(items)
        }
        0x02 => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        0x03 => {
            fixed(8)?;
            Value::LongInteger(i64::from_be_bytes(v.try_into().map_err(|_| "bad length")?))
        }
        0x04 => {
            if !len.is_multiple_of(8) {
                return Err(format!("big integer {tag:06X} has length {len}"));
            }
            Value::BigInteger(v.to_vec())
        }
        0x05 => {
            fixed(4)?;
            Value::Enumeration(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        0x06 => {
            fixed(8)?;
            match u64::from_be_bytes(v.try_into().map_err(|_| "bad length")?) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return Err(format!("boolean {tag:06X} is neither 0 nor 1")),
            }
        }
        0x07 => Value::TextString(String::from_utf8(v.to_vec()).map_err(|_| format!("text {tag:06X} is not UTF-8"))?),
        0x08 => Value::ByteString(Zeroizing::new(v.to_vec())),
        0x09 => {
            fixed(8)?;
            Value::DateTime(i64::from_be_bytes(v.try_into().map_err(|_| "bad length")?))
        }
        0x0A => {
            fixed(4)?;
            Value::Interval(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        other => return Err(format!("item {tag:06X} has unknown type {other:#04x}")),
    };
    Ok((Item { tag, value }, 8 + padded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The encoding examples of the KMIP 1.4 specification, section 9.1.2
    /// ("Examples"), tag 420020 throughout.
    const SPEC_EXAMPLES: [(&str, &str); 9] = [
        ("integer 8", "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00"),
        ("long integer 123456789000000000", "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00"),
        ("enumeration 255", "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00"),
        ("boolean true", "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01"),
        ("text Hello World", "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00"),
        ("bytes 010203", "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00"),
        ("date-time 2008-03-14 11:56:40", "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8"),
        ("interval 864000", "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00"),
        (
            "structure of enumeration 254 and integer 255",
            "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | \
             42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        ),
    ];

    fn spec_item(i: usize) -> Item {
        const T: u32 = 0x420020;
        let value = match i {
            0 => Value::Integer(8),
            1 => Value::LongInteger(123456789000000000),
            2 => Value::Enumeration(255),
            3 => Value::Boolean(true),
            4 => Value::TextString("Hello World".into()),
            5 => Value::ByteString(Zeroizing::new(vec![1, 2, 3])),
            6 => Value::DateTime(0x47DA67F8),
            7 => Value::Interval(864000),
            _ => Value::Structure(vec![Item::enumeration(0x420004, 254), Item::integer(0x420005, 255)]),
        };
        Item { tag: T, value }
    }

    #[test]
    fn spec_examples_encode_and_decode() {
        for (i, (what, bytes)) in SPEC_EXAMPLES.iter().enumerate() {
            let want = hex(bytes);
            let mut got = Vec::new();
            spec_item(i).encode(&mut got);
            assert_eq!(got, want, "{what}");
            let back = Item::decode(&want).unwrap();
            let mut again = Vec::new();
            back.encode(&mut again);
            assert_eq!(again, want, "{what}");
            assert_eq!(message_len(&want[..8].try_into().unwrap()), want.len(), "{what}");
        }
        let s = Item::decode(&hex(SPEC_EXAMPLES[8].1)).unwrap();
        assert_eq!(s.find(0x420004).and_then(Item::as_enum), Some(254));
        assert!(s.find(0x420006).is_none());
    }

    #[test]
    fn malformed_input_is_refused() {
        let good = hex(SPEC_EXAMPLES[8].1);
        for cut in [0, 7, 8, 20, good.len() - 1] {
            assert!(Item::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.extend_from_slice(&[0; 8]);
        assert!(Item::decode(&extra).is_err());
        let mut badpad = hex(SPEC_EXAMPLES[5].1);
        badpad[15] = 1;
        assert!(Item::decode(&badpad).err().unwrap().contains("padding"));
        let mut badlen = hex(SPEC_EXAMPLES[0].1);
        badlen[7] = 5;
        assert!(Item::decode(&badlen).is_err());
        let mut badtype = hex(SPEC_EXAMPLES[0].1);
        badtype[3] = 0x0B;
        assert!(Item::decode(&badtype).err().unwrap().contains("unknown type"));
        let mut badbool = hex(SPEC_EXAMPLES[3].1);
        badbool[15] = 2;
        assert!(Item::decode(&badbool).is_err());
        // a structure nested deeper than MAX_DEPTH
        let mut deep = Item::integer(0x420001, 1);
        for _ in 0..20 {
            deep = Item::structure(0x420002, vec![deep]);
        }
        let mut buf = Vec::new();
        deep.encode(&mut buf);
        assert!(Item::decode(&buf).err().unwrap().contains("deeply"));
    }
}

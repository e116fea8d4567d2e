//! Sequence fields whose element count is refused *before* allocation when it exceeds a limit.
//!
//! serde's stock `Vec` visitor pre-allocates up to 1 MiB from an announced length and then grows
//! with the input; a frame of many tiny elements (1 byte on the wire, 24+ bytes in memory) could
//! still inflate well past the frame limit. These helpers check the count postcard announces
//! against the field's documented maximum first, so memory stays proportional to the frame.

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

struct BoundedVisitor<T, const N: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for BoundedVisitor<T, N> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {N} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let announced = seq.size_hint().unwrap_or(0);
        if announced > N {
            return Err(A::Error::invalid_length(announced, &self));
        }
        // Never reserve more than a small batch up front: the input may end long before the
        // announced count, and each element costs at least one input byte anyway.
        let mut out = Vec::with_capacity(announced.min(64));
        while let Some(item) = seq.next_element()? {
            if out.len() == N {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// Deserializes a `Vec<T>` of at most `N` elements.
pub fn vec<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(BoundedVisitor::<T, N>(PhantomData))
}

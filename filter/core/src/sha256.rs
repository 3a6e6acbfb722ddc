//! SHA-256 and HMAC-SHA-256, the one place core takes them from for the request path (the
//! signature's HMAC (ID-2), Content-Digest (DATA-3), the evidence's hash of the signature base
//! (LOG-5), the stores' keyed names).
//!
//! Two implementations of the same functions, chosen when core is built: the `sha2`/`hmac`
//! crates (pure Rust; the Wasm filter, the CLI; their 0.11 release, whose SHA-256 runs on Wasm
//! SIMD when the module is built with `simd128`, as `.cargo/config.toml` builds the filter)
//! and, with the `ring` feature (the native module), ring's assembly, which uses the CPU's SHA
//! extensions and otherwise its AVX or SSSE3 code where the `sha2` crate falls back to portable
//! code (x86 servers without the SHA extensions, and any run under valgrind). Both give the
//! same bytes: the unit tests below check known answers and compare the implementation built
//! against the `sha2` crate's 0.10 line; the Wasm build's end-to-end tests verify every partner
//! signature through the `sha2` path.

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256(Inner);

#[cfg(not(feature = "ring"))]
type Inner = sha2_simd::Sha256;
#[cfg(feature = "ring")]
type Inner = ring::digest::Context;

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    #[cfg(not(feature = "ring"))]
    pub fn new() -> Sha256 {
        use sha2_simd::Digest as _;
        Sha256(sha2_simd::Sha256::new())
    }

    #[cfg(feature = "ring")]
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        #[cfg(not(feature = "ring"))]
        sha2_simd::Digest::update(&mut self.0, bytes);
        #[cfg(feature = "ring")]
        self.0.update(bytes);
    }

    /// `update`, for chaining.
    pub fn chain(mut self, bytes: &[u8]) -> Sha256 {
        self.update(bytes);
        self
    }

    pub fn finalize(self) -> [u8; 32] {
        #[cfg(not(feature = "ring"))]
        {
            sha2_simd::Digest::finalize(self.0).into()
        }
        #[cfg(feature = "ring")]
        {
            let mut out = [0u8; 32];
            out.copy_from_slice(self.0.finish().as_ref());
            out
        }
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::new().chain(bytes).finalize()
}

/// An HMAC-SHA-256 key with its inner and outer pads already hashed (RFC 2104): made once when
/// the policy is read, so that a request's check hashes only its message (two compressions a
/// request fewer).
#[derive(Clone)]
pub struct HmacKey(KeyInner);

#[cfg(not(feature = "ring"))]
type KeyInner = Option<hmac_simd::Hmac<sha2_simd::Sha256>>;
#[cfg(feature = "ring")]
type KeyInner = ring::hmac::Key;

impl HmacKey {
    /// `key` of any length, as RFC 2104.
    pub fn new(key: &[u8]) -> HmacKey {
        #[cfg(not(feature = "ring"))]
        {
            // HMAC takes a key of any length; new_from_slice cannot fail for it (were it to,
            // the key signs nothing and verifies nothing)
            HmacKey(
                <hmac_simd::Hmac<sha2_simd::Sha256> as hmac_simd::KeyInit>::new_from_slice(key)
                    .ok(),
            )
        }
        #[cfg(feature = "ring")]
        {
            HmacKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
        }
    }

    /// HMAC-SHA-256 of `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 32] {
        #[cfg(not(feature = "ring"))]
        {
            use hmac_simd::Mac as _;
            match self.0.clone() {
                Some(mut m) => {
                    m.update(msg);
                    m.finalize().into_bytes().into()
                }
                None => [0u8; 32],
            }
        }
        #[cfg(feature = "ring")]
        {
            let mut out = [0u8; 32];
            out.copy_from_slice(ring::hmac::sign(&self.0, msg).as_ref());
            out
        }
    }

    /// Whether `sig` is the HMAC-SHA-256 of `msg`, compared in constant time.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        #[cfg(not(feature = "ring"))]
        {
            use hmac_simd::Mac as _;
            self.0.clone().is_some_and(|mut m| {
                m.update(msg);
                m.verify_slice(sig).is_ok()
            })
        }
        #[cfg(feature = "ring")]
        {
            ring::hmac::verify(&self.0, msg, sig).is_ok()
        }
    }
}

/// HMAC-SHA-256 of `msg` under `key` (any length, as RFC 2104).
pub fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    HmacKey::new(key).sign(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::tests::hex as unhex;

    #[test]
    fn known_answers() {
        // FIPS 180-2 appendix B.1 and B.2
        assert_eq!(
            digest(b"abc").to_vec(),
            unhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        let two = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(
            digest(two).to_vec(),
            unhex("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        );
        // incremental equals one-shot, across block edges
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0, 1, 55, 56, 63, 64, 65, 128, 299, 300] {
            let mut h = Sha256::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            assert_eq!(h.finalize(), digest(&data), "cut at {cut}");
        }
        // RFC 4231 test cases 1 and 6 (a key longer than the block)
        assert_eq!(
            hmac(&[0x0b; 20], b"Hi There").to_vec(),
            unhex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        );
        let long_key = [0xaa; 131];
        let msg = b"Test Using Larger Than Block-Size Key - Hash Key First";
        let want = unhex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
        assert_eq!(hmac(&long_key, msg).to_vec(), want);
        let key = HmacKey::new(&long_key);
        assert!(key.verify(msg, &want));
        let mut bad = want.clone();
        bad[31] ^= 1;
        assert!(!key.verify(msg, &bad));
        assert!(!key.verify(msg, &want[..31]));
        assert!(!key.verify(msg, &[]));
        // an empty key is a key
        assert_eq!(hmac(&[], b"").len(), 32);
    }

    #[test]
    fn a_key_made_once_checks_many_messages() {
        // the policy makes the key once; each request's check must start from the pads alone
        let key = HmacKey::new(&[0x0b; 20]);
        let first = key.sign(b"Hi There");
        assert_eq!(first, hmac(&[0x0b; 20], b"Hi There"));
        assert!(key.verify(b"Hi There", &first));
        assert!(
            key.verify(b"Hi There", &first),
            "a second check of the same tag"
        );
        assert!(!key.verify(b"Hi There!", &first));
        assert_eq!(key.sign(b"other"), hmac(&[0x0b; 20], b"other"));
        assert_eq!(key.sign(b"Hi There"), first);
    }

    #[test]
    fn same_bytes_as_the_sha2_crate() {
        // against the 0.10 line of the crates (the one the rest of core uses): an
        // implementation independent of the SIMD backend this module is built with
        use hmac::Mac as _;
        use sha2::Digest as _;
        for n in [0usize, 1, 63, 64, 65, 200, 1000] {
            let data: Vec<u8> = (0..n).map(|i| (i * 13 % 256) as u8).collect();
            let want: [u8; 32] = sha2::Sha256::digest(&data).into();
            assert_eq!(digest(&data), want);
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&data[..n.min(100)]).unwrap();
            m.update(&data);
            let tag: [u8; 32] = m.finalize().into_bytes().into();
            assert_eq!(hmac(&data[..n.min(100)], &data), tag);
        }
    }
}

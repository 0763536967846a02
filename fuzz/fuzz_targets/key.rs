//! The `Idempotency-Key` header value, as a client sends it: any bytes. A key that parses is
//! 1 to 255 printable ASCII characters, reads back the same once written as an sf-string, and
//! makes a backend key the backend takes; any other value is one of the documented errors.
#![no_main]

use idempotency::key::{self, MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &[u8]| {
    match key::parse(value) {
        Ok(k) => {
            assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN, "{k:?}");
            assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{k:?}");
            // The same key written as an RFC 8941 sf-string parses back to itself.
            let quoted = format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""));
            assert_eq!(key::parse(quoted.as_bytes()).as_deref(), Ok(k.as_str()));
            let backend = key::backend_key(&[0xa5; 32], &k);
            assert!(idempotency_spec::is_valid_key(&backend), "{backend}");
        }
        Err(e) => assert!(!e.detail().is_empty()),
    }
});

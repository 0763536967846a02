//! The filter's configuration, as an operator (or a mistake) writes it: any bytes. It parses
//! or it is one error of one line naming its field; what parses is shown again by `to_json`
//! and that reads back to the same configuration.
#![no_main]

use idempotency::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match Config::parse(bytes) {
        Ok(config) => {
            let shown = config.to_json();
            // The token is shown as "***": everything else reads back as it was.
            if config.server.token.is_none() {
                let again = Config::from_value(&shown).expect("the effective configuration parses");
                assert_eq!(again, config);
            }
        }
        Err(e) => {
            let line = e.to_string();
            // A host logs it as one line (Kong's error log, Envoy's): no line break, however
            // the field names or values are spelt.
            assert!(!line.contains(['\n', '\r']), "{line:?}");
            assert!(line.starts_with("invalid configuration: "), "{line:?}");
        }
    }
});

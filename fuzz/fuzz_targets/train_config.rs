//! Training config TOML: any text parses and validates or gives an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<ddpm_train::TrainConfig>(text) {
        let _ = config.validate();
    }
});

//! `sar reference` input decoding: arbitrary bytes split into a safetensors file and an options
//! JSON. Decoding, validation and the step return `Ok` or an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sar_train::reference::{load_case, parse_options, run_case};
use sar_train::tensorio::TensorFile;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len().saturating_sub(1));
    let (json, tensors) = data.get(1..).unwrap_or(&[]).split_at(split.min(data.len().saturating_sub(1)));
    let config = match std::str::from_utf8(json).ok().and_then(|s| parse_options(s).ok()) {
        Some(c) => c,
        None => sar_math::SarConfig::default(),
    };
    if let Ok(file) = TensorFile::from_bytes("fuzz".into(), tensors.to_vec()) {
        if let Ok(case) = load_case(&file, &config) {
            // Keep runs short: the kernels are fuzzed on their own.
            if case.features.len() <= 1 << 16 && case.labels.len() <= 1 << 16 {
                let _ = run_case(&case, &config);
            }
        }
    }
});

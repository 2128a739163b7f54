//! The trainer's file inputs on arbitrary bytes: the TOML training config (with `--set`
//! overrides taken from the text's last lines) and checkpoint files. The first byte picks which.
//! Each returns a value or an error, never panics; a config that parses has passed validation,
//! a checkpoint that loads has a matching checksum.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    if which % 2 == 0 {
        let Ok(text) = std::str::from_utf8(bytes) else { return };
        let (body, overrides) = match text.split_once("\n--\n") {
            Some((b, o)) => (b, o.lines().map(String::from).collect::<Vec<_>>()),
            None => (text, Vec::new()),
        };
        if let Ok(cfg) = sar_train::config::parse(body, &overrides) {
            cfg.validate().expect("a parsed config is valid");
            // Its own TOML parses back to itself.
            assert_eq!(sar_train::config::parse(&cfg.to_toml(), &[]).unwrap(), cfg);
        }
    } else if let Ok(ck) = sar_train::checkpoint::from_bytes(bytes) {
        assert_eq!(ck.state.format, sar_train::checkpoint::FORMAT);
    }
});

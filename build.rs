//! Compiles the C shim for the parts of the Tcl API that are macros
//! (`Tcl_InitStubs`) and links Tcl's stub library, so the extension
//! calls Tcl only through the stubs table and never links libtcl itself.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/stubs_shim.c");
    let include = tcl_include_dir();
    cc::Build::new()
        .file("src/stubs_shim.c")
        .include(&include)
        .define("USE_TCL_STUBS", None)
        .warnings(true)
        .compile("socketserver_shim");
    let libdir = tcl_config("TCL_STUB_LIB_PATH")
        .and_then(|p| std::path::Path::new(&p).parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu".into());
    println!("cargo:rustc-link-search=native={libdir}");
    println!("cargo:rustc-link-lib=static=tclstub8.6");
}

/// Reads one variable from tclConfig.sh, the file every Tcl install ships
/// to tell extensions where its headers and libraries are.
fn tcl_config(var: &str) -> Option<String> {
    let candidates = [
        std::env::var("TCL_CONFIG").unwrap_or_default(),
        "/usr/lib/x86_64-linux-gnu/tcl8.6/tclConfig.sh".into(),
        "/usr/lib/tcl8.6/tclConfig.sh".into(),
        "/usr/local/lib/tclConfig.sh".into(),
    ];
    let path = candidates.iter().find(|p| !p.is_empty() && std::path::Path::new(p).exists())?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(". '{path}' && printf %s \"${var}\""))
        .output()
        .ok()?;
    let value = String::from_utf8(out.stdout).ok()?;
    (!value.is_empty()).then_some(value)
}

fn tcl_include_dir() -> String {
    tcl_config("TCL_INCLUDE_SPEC")
        .map(|spec| spec.trim_start_matches("-I").to_string())
        .unwrap_or_else(|| "/usr/include/tcl8.6".into())
}

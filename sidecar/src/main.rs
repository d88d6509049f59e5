//! `mlx-flash-sidecar`: the sidecar as a standalone binary; same flags as `mlx-flash serve`.

fn main() {
    std::process::exit(mlx_flash_sidecar::main_with_args(std::env::args_os()));
}

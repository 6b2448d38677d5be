# Stand-in for the packages feed's lang/rust/rust-values.mk, used when OPENWRT_RUST_DIR does
# not point at a real lang/rust. It restates what that file exports into every Rust
# package's cargo command as of openwrt/packages 0521bb5 (2026-08), profile overrides
# included: those are what the feed Makefile must counter.
RUSTC_TARGET_ARCH:=$(subst openwrt,unknown,$(REAL_GNU_TARGET_NAME))
RUSTC_TARGET_UPPER=$(subst -,_,$(call toupper,$(RUSTC_TARGET_ARCH)))
CARGO_HOME:=$(DL_DIR)/cargo
CARGO_RUSTFLAGS+=-Ctarget-feature=-crt-static -Clink-arg=-fuse-ld=$(TARGET_LINKER)
CARGO_PKG_CONFIG_VARS= \
	CARGO_BUILD_TARGET=$(RUSTC_TARGET_ARCH) \
	CARGO_HOME=$(CARGO_HOME) \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
	CARGO_PROFILE_RELEASE_DEBUG=false \
	CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=false \
	CARGO_PROFILE_RELEASE_LTO=true \
	CARGO_PROFILE_RELEASE_OPT_LEVEL=z \
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
	CARGO_PROFILE_RELEASE_PANIC=unwind \
	CARGO_PROFILE_RELEASE_RPATH=false \
	CARGO_TARGET_$(RUSTC_TARGET_UPPER)_LINKER=$(TARGET_CC_NOCACHE) \
	RUSTFLAGS="$(CARGO_RUSTFLAGS)" \
	TARGET_CC=$(TARGET_CC_NOCACHE) \
	TARGET_CFLAGS="$(TARGET_CFLAGS)"
CARGO_PKG_PROFILE:=release
RUST_ARCH_DEPENDS:=@(aarch64||arm||x86_64)

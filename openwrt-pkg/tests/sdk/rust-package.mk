# Stand-in for the packages feed's lang/rust/rust-package.mk (see rust-values.mk here):
# the cargo command its Build/Compile/Cargo runs, with CARGO_PKG_VARS in front.
include $(dir $(lastword $(MAKEFILE_LIST)))rust-values.mk
RUST_PKG_LOCKED?=1
CARGO_PKG_VARS= $(CARGO_PKG_CONFIG_VARS) CC=$(HOSTCC_NOCACHE) MAKEFLAGS="$(PKG_JOBS)"
CARGO_PKG_ARGS=$(if $(filter 1,$(RUST_PKG_LOCKED)),--locked)
define Build/Compile/Cargo
	+$(CARGO_PKG_VARS) cargo install -v --profile $(CARGO_PKG_PROFILE) \
		$(if $(strip $(RUST_PKG_FEATURES)),--features "$(strip $(RUST_PKG_FEATURES))") \
		--root $(PKG_INSTALL_DIR) --path "$(PKG_BUILD_DIR)/$(strip $(1))" \
		$(if $(filter --jobserver%,$(PKG_JOBS)),,-j1) $(CARGO_PKG_ARGS) $(2)
endef
define RustBinPackage
endef
Build/Compile=$(call Build/Compile/Cargo)

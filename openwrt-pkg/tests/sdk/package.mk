# Stand-in for include/package.mk: the SDK's download check, unpack, Build/Compile and
# Package/<name>/install, as make targets sdk-build.sh runs.
PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR?=$(PKG_BUILD_DIR)/ipkg-install
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600

define BuildPackage
download:
	@[ -n "$(PKG_HASH)" ] || { echo "PKG_HASH is not set" >&2; exit 1; }
	@echo "$(PKG_HASH)  $(DL_DIR)/$(PKG_SOURCE)" | sha256sum -c --quiet -
	@echo "source: $(PKG_SOURCE) from $(PKG_SOURCE_URL) matches PKG_HASH"
prepare: download
	rm -rf $(PKG_BUILD_DIR) && mkdir -p $(BUILD_DIR)
	tar -xzf $(DL_DIR)/$(PKG_SOURCE) -C $(BUILD_DIR)
	@test -d $(PKG_BUILD_DIR)
	@for f in $(PKG_LICENSE_FILES); do test -f $(PKG_BUILD_DIR)/$$$$f || { echo "PKG_LICENSE_FILES: no $$$$f in the source" >&2; exit 1; }; done
compile:
	$(Build/Compile)
print-cargo-vars:
	@echo '$(CARGO_PKG_VARS)'
install:
	rm -rf $(W)/root && mkdir -p $(W)/root
	$(call Package/$(1)/install,$(W)/root)
endef

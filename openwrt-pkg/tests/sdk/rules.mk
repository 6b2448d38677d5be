# Stand-in for the OpenWrt buildroot's rules.mk: only the variables the feed Makefile
# and lang/rust's .mk files read, for an x86_64 host build (sdk-build.sh sets W).
BUILD_DIR:=$(W)/build
DL_DIR:=$(W)/dl
STAGING_DIR:=$(W)/staging
INCLUDE_DIR:=$(W)/include
SCRIPT_DIR:=$(W)/scripts
TMP_DIR:=$(W)/tmp
HOST_ARCH:=x86_64
HOST_OS:=Linux
GNU_HOST_NAME:=x86_64-pc-linux-gnu
ARCH:=x86_64
REAL_GNU_TARGET_NAME:=x86_64-unknown-linux-gnu
TARGET_CC_NOCACHE:=cc
HOSTCC_NOCACHE:=cc
TARGET_LINKER:=bfd
TARGET_CFLAGS:=-Os
PKG_JOBS:=-j2
toupper=$(shell echo '$(1)' | tr a-z A-Z)

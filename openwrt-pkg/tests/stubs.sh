# Stand-ins for OpenWrt's /lib/functions.sh (UCI access) and /lib/functions/procd.sh,
# sourced before chuted.init so start_service can run on any POSIX shell. The procd_*
# stubs append what the init script asked procd for to $RECORD, one line per call,
# arguments separated by a single space and wrapped in [] so empty or spaced arguments
# stay visible: `command [/usr/bin/chuted] [run] ...`.

# UCI: parses `config TYPE 'NAME'` / `option KEY 'VALUE'` from $UCI_DIR/<package> the way
# config_load does: an option present with an empty value is set (config_get returns ''),
# an absent option is unset (config_get returns the default).
config_load() {
	UCI_VALUES=$(awk '
		function unq(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s)
			if (s ~ /^'\''.*'\''$/ || s ~ /^".*"$/) s = substr(s, 2, length(s) - 2); return s }
		/^[ \t]*config[ \t]/ { n = split($0, f, /[ \t]+/); sec = unq(f[3]); next }
		/^[ \t]*option[ \t]/ { line = $0; sub(/^[ \t]*option[ \t]+/, "", line)
			key = line; sub(/[ \t].*$/, "", key); val = line; sub(/^[^ \t]+/, "", val)
			print sec "\t" key "\t" unq(val) }
	' "$UCI_DIR/$1")
}

config_get() {
	# config_get VAR SECTION OPTION [DEFAULT]
	_line=$(printf '%s\n' "$UCI_VALUES" | awk -F '\t' -v s="$2" -v k="$3" \
		'$1 == s && $2 == k { print "set\t" $3; exit }')
	if [ -n "$_line" ]; then
		_val=${_line#set	}
	else
		_val=${4-}
	fi
	eval "$1=\$_val"
}

config_get_bool() {
	config_get _b "$2" "$3" "${4-}"
	case "$_b" in
		1 | on | true | yes | enabled) _b=1 ;;
		0 | off | false | no | disabled) _b=0 ;;
		*) _b=${4-0} ;;
	esac
	eval "$1=\$_b"
}

_record() {
	_out=$1
	shift
	for _a in "$@"; do _out="$_out [$_a]"; done
	printf '%s\n' "$_out" >>"$RECORD"
}
procd_open_instance() { _record open_instance "$@"; }
procd_close_instance() { _record close_instance; }
procd_set_param() { _k=$1; shift; _record "set $_k" "$@"; }
procd_append_param() { _k=$1; shift; _record "append $_k" "$@"; }
procd_add_reload_trigger() { _record reload_trigger "$@"; }
logger() { _record logger "$@"; }

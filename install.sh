#!/bin/sh
# install.sh - install aion-connector: the binary, a starter config, a systemd unit.
#
# Idempotent: running it again replaces the binary and the unit when they
# differ, and never touches an existing config file.
#
#   sh install.sh [--prefix DIR] [--binary PATH|DIR] [--config PATH] [--user NAME]
#                 [--public] [--no-systemd] [--print-unit]
#
# See `sh install.sh --help`.
set -eu

UNIT_PATH=/etc/systemd/system/aion-connector.service
UNIT_NAME=aion-connector.service
STATE_DIR=/var/lib/aion-connector
WORKSPACE_DIR=$STATE_DIR/workspace

PREFIX=/usr/local
BINARY=
CONFIG=/etc/aion-connector/aion.config.json
SYSTEMD=yes
PUBLIC=no
NEW_TLS=no
SERVICE_USER=aion-connector
PRINT_UNIT=no

BINARY_CHANGED=no
UNIT_CHANGED=no

usage() {
	cat <<'EOF'
Usage: sh install.sh [OPTIONS]

Install aion-connector as PREFIX/bin/aion-connector (and its man page as
PREFIX/share/man/man1/aion-connector.1), write a starter config unless one
exists, and install a systemd unit.

Options:
  --prefix DIR     install prefix (default /usr/local); the binary goes to
                   DIR/bin/aion-connector
  --binary PATH    install this binary instead of building from this checkout
  --binary DIR     install DIR/aion-connector-ARCH, ARCH being this machine's
                   (uname -m: x86_64 or aarch64)
  --config PATH    config file (default /etc/aion-connector/aion.config.json);
                   an existing file is never modified
  --user NAME      run the service as NAME (default aion-connector, a system
                   user created with its home in /var/lib/aion-connector);
                   --user root works but is not recommended
  --public         in a new starter config, listen on 0.0.0.0 instead of
                   127.0.0.1 and serve TLS with a self-signed certificate
                   ("tls": {"selfSigned": true}); prints its fingerprint
                   and the URL to paste into AION
  --no-systemd     do not write or enable the systemd unit
  --print-unit     print the systemd unit this would write, and exit
  -h, --help       show this help

Project dirs of the config outside /var/lib/aion-connector are read-only for
the service: they are listed with the ReadWritePaths= drop-in and the chown
that would make them writable (install.sh changes none of them).

Without --binary the script runs `cargo build --release` in the checkout it
lives in (for ARCH-unknown-linux-musl when that target is installed).
If cargo is only on your user's PATH, build first and then run
  sudo sh install.sh --binary target/x86_64-unknown-linux-musl/release/aion-connector
A directory of static binaries, one per machine, serves every machine:
  dist/aion-connector-x86_64  dist/aion-connector-aarch64
  sudo sh install.sh --binary dist
EOF
}

say() {
	printf 'install.sh: %s\n' "$*"
}

die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}

usage_error() {
	printf 'install.sh: %s\n' "$*" >&2
	printf 'Try: sh install.sh --help\n' >&2
	exit 2
}

# Make $1 absolute (relative to the current directory) and print it.
absolute() {
	case $1 in
	/*) printf '%s\n' "$1" ;;
	*) printf '%s/%s\n' "$(pwd)" "$1" ;;
	esac
}

# Paths end up in a systemd ExecStart= line; keep them to plain characters.
check_plain_path() {
	case $2 in
	*[[:space:]\"\'\\%\$]*)
		usage_error "$1: paths with spaces, quotes, backslashes, % or \$ are not supported: $2"
		;;
	esac
}

parse_args() {
	while [ $# -gt 0 ]; do
		case $1 in
		--prefix)
			[ $# -ge 2 ] || usage_error "--prefix needs a directory"
			PREFIX=$2
			shift 2
			;;
		--prefix=*)
			PREFIX=${1#--prefix=}
			shift
			;;
		--binary)
			[ $# -ge 2 ] || usage_error "--binary needs a path"
			BINARY=$2
			shift 2
			;;
		--binary=*)
			BINARY=${1#--binary=}
			shift
			;;
		--config)
			[ $# -ge 2 ] || usage_error "--config needs a path"
			CONFIG=$2
			shift 2
			;;
		--config=*)
			CONFIG=${1#--config=}
			shift
			;;
		--public)
			PUBLIC=yes
			shift
			;;
		--no-systemd)
			SYSTEMD=no
			shift
			;;
		--user)
			[ $# -ge 2 ] || usage_error "--user needs a name"
			SERVICE_USER=$2
			shift 2
			;;
		--user=*)
			SERVICE_USER=${1#--user=}
			shift
			;;
		--print-unit)
			PRINT_UNIT=yes
			shift
			;;
		-h | --help)
			usage
			exit 0
			;;
		*)
			usage_error "unknown argument: $1"
			;;
		esac
	done

	[ -n "$PREFIX" ] || usage_error "--prefix must not be empty"
	case $SERVICE_USER in
	'' | -* | *[!a-z0-9_-]*) usage_error "--user: a user name of lowercase letters, digits, - and _: $SERVICE_USER" ;;
	esac
	[ -n "$CONFIG" ] || usage_error "--config must not be empty"
	PREFIX=$(absolute "$PREFIX")
	CONFIG=$(absolute "$CONFIG")
	check_plain_path --prefix "$PREFIX"
	check_plain_path --config "$CONFIG"
	if [ -n "$BINARY" ]; then
		BINARY=$(absolute "$BINARY")
	fi
}

# The directory this script lives in (the checkout to build from).
source_dir() {
	case $0 in
	*/*) script_dir=${0%/*} ;;
	*) script_dir=. ;;
	esac
	(cd -- "$script_dir" && pwd -P)
}

# This machine's architecture as Rust and the binaries name it: x86_64,
# aarch64 (which some systems call arm64), or whatever uname -m says.
machine_arch() {
	arch=$(uname -m)
	case $arch in
	arm64 | armv8*) arch=aarch64 ;;
	amd64) arch=x86_64 ;;
	esac
	printf '%s\n' "$arch"
}

# --binary DIR: set BINARY to DIR/aion-connector-ARCH for this machine.
pick_binary() {
	dir=${BINARY%/}
	arch=$(machine_arch)
	BINARY=$dir/aion-connector-$arch
	if [ ! -f "$BINARY" ]; then
		found=
		for f in "$dir"/aion-connector-*; do
			[ -f "$f" ] && found="$found ${f##*/}"
		done
		die "no binary for this machine ($arch) in $dir: expected aion-connector-$arch${found:+ (found:$found)}"
	fi
	say "$arch machine: using $BINARY"
}

# Build with cargo and set BINARY to the result.
build_binary() {
	src=$(source_dir)
	[ -f "$src/Cargo.toml" ] || die "no Cargo.toml next to install.sh ($src); use --binary PATH"
	command -v cargo >/dev/null 2>&1 ||
		die "cargo not found on PATH; build first (cargo build --release) and use --binary PATH"

	musl=$(machine_arch)-unknown-linux-musl
	target=
	if command -v rustc >/dev/null 2>&1; then
		sysroot=$(rustc --print sysroot 2>/dev/null || true)
		if [ -n "$sysroot" ] && [ -d "$sysroot/lib/rustlib/$musl" ]; then
			target=$musl
		fi
	fi

	target_dir=${CARGO_TARGET_DIR:-target}
	case $target_dir in
	/*) ;;
	*) target_dir=$src/$target_dir ;;
	esac

	if [ -n "$target" ]; then
		say "building in $src (cargo build --release --target $target)"
		(cd -- "$src" && cargo build --release --target "$target")
		BINARY=$target_dir/$target/release/aion-connector
	else
		say "building in $src (cargo build --release; the $musl target is not installed)"
		(cd -- "$src" && cargo build --release)
		BINARY=$target_dir/release/aion-connector
	fi
}

install_binary() {
	if [ -z "$BINARY" ]; then
		build_binary
	elif [ -d "$BINARY" ]; then
		pick_binary
	fi
	[ -f "$BINARY" ] || die "binary not found: $BINARY"

	bindir=$PREFIX/bin
	dest=$bindir/aion-connector
	mkdir -p -- "$bindir"

	if [ -f "$dest" ] && cmp -s -- "$BINARY" "$dest"; then
		chmod 0755 "$dest"
		say "binary unchanged: $dest"
		return 0
	fi

	# Install next to the target and rename over it, so that a running
	# binary is replaced atomically rather than rewritten in place.
	tmp=$dest.new.$$
	install -m 0755 "$BINARY" "$tmp"
	mv -f -- "$tmp" "$dest"
	BINARY_CHANGED=yes
	say "installed $dest"
}

agent_description() {
	case $1 in
	claude) echo "Claude Code" ;;
	codex) echo "Codex" ;;
	pi) echo "Pi" ;;
	opencode) echo "OpenCode" ;;
	gemini) echo "Gemini" ;;
	cursor) echo "Cursor" ;;
	copilot) echo "Copilot" ;;
	kiro) echo "Kiro" ;;
	qwen) echo "Qwen" ;;
	trae) echo "Trae" ;;
	openclaw) echo "OpenClaw" ;;
	droid) echo "Droid" ;;
	kilocode) echo "Kilocode" ;;
	kimi) echo "Kimi" ;;
	qoder) echo "Qoder" ;;
	iflow) echo "iFlow" ;;
	*) echo "$1" ;;
	esac
}

# Print the "agents" object body: the known agent CLIs found on PATH.
agents_json() {
	agents_sep=
	for agent in claude codex pi opencode gemini cursor copilot kiro qwen trae \
		openclaw droid kilocode kimi qoder iflow; do
		if command -v "$agent" >/dev/null 2>&1; then
			printf '%s\n        "%s": { "description": "%s" }' \
				"$agents_sep" "$agent" "$(agent_description "$agent")"
			agents_sep=,
		fi
	done
}

found_agents() {
	found=
	for agent in claude codex pi opencode gemini cursor copilot kiro qwen trae \
		openclaw droid kilocode kimi qoder iflow; do
		if command -v "$agent" >/dev/null 2>&1; then
			found="$found $agent"
		fi
	done
	printf '%s\n' "${found# }"
}

new_token() {
	token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
	[ ${#token} -eq 64 ] || die "could not read a token from /dev/urandom"
	printf '%s\n' "$token"
}

install_config() {
	if [ -e "$CONFIG" ] || [ -L "$CONFIG" ]; then
		[ -f "$CONFIG" ] || die "config path exists but is not a file: $CONFIG"
		say "config kept: $CONFIG (existing file not modified)"
		return 0
	fi

	config_dir=${CONFIG%/*}
	[ -n "$config_dir" ] || config_dir=/
	if [ ! -d "$config_dir" ]; then
		# Only the config's own directory gets mode 0700; parents that have
		# to be created get the usual mode, and existing ones are left alone.
		parent=${config_dir%/*}
		if [ -n "$parent" ]; then
			mkdir -p -- "$parent"
		fi
		mkdir -m 0700 -- "$config_dir"
		say "created $config_dir (mode 0700)"
	fi

	if [ "$PUBLIC" = yes ]; then
		host=0.0.0.0
		# Reachable from anywhere: HTTPS with a self-signed pair whose
		# fingerprint AION pins (print_tls below).
		tls='
  "tls": { "selfSigned": true },'
		NEW_TLS=yes
	else
		host=127.0.0.1
		tls=
	fi
	agents=$(agents_json)
	if [ -n "$agents" ]; then
		agents="{$agents
      }"
	else
		agents="{}"
	fi

	tmp=$CONFIG.new.$$
	(
		umask 077
		token=$(new_token)
		cat >"$tmp" <<EOF
{
  "port": 7777,
  "host": "$host",$tls
  "projects": {
    "default": {
      "token": "$token",
      "dir": "$WORKSPACE_DIR",
      "agents": $agents
    }
  }
}
EOF
	)
	chmod 0600 "$tmp"
	mv -f -- "$tmp" "$CONFIG"

	say "wrote starter config: $CONFIG (mode 0600, host $host, port 7777, project \"default\")"
	agent_list=$(found_agents)
	if [ -n "$agent_list" ]; then
		say "agents found on PATH: $agent_list"
	else
		say "no known agent CLI found on PATH; add agents to the config by hand"
	fi
	say "edit it: use your AION project id instead of \"default\" and make the token match AION's"
}

# A new --public config serves TLS: generate the self-signed pair now, as the
# service user and in the service's state dir (the service reuses it), and
# say what to paste into AION.
print_tls() {
	[ "$NEW_TLS" = yes ] || return 0
	bin=$PREFIX/bin/aion-connector
	if [ "$SYSTEMD" = no ] || ! command -v systemctl >/dev/null 2>&1; then
		say "TLS is on (self-signed); as the user that serves the config, run:"
		say "  $bin fingerprint $CONFIG"
		say "and paste https://<this machine's public IP or DNS name>:7777 and that fingerprint into AION"
		return 0
	fi
	mkdir -p -- "$STATE_DIR"
	if [ "$SERVICE_USER" = root ]; then
		fp=$(cd "$STATE_DIR" && STATE_DIRECTORY=$STATE_DIR "$bin" fingerprint "$CONFIG")
	elif command -v runuser >/dev/null 2>&1; then
		fp=$(cd "$STATE_DIR" && runuser -u "$SERVICE_USER" -- env STATE_DIRECTORY="$STATE_DIR" HOME="$STATE_DIR" "$bin" fingerprint "$CONFIG")
	else
		fp=$(cd "$STATE_DIR" && su -s /bin/sh "$SERVICE_USER" -c "STATE_DIRECTORY='$STATE_DIR' HOME='$STATE_DIR' '$bin' fingerprint '$CONFIG'")
	fi || die "cannot generate the TLS certificate (aion-connector fingerprint $CONFIG failed)"
	fp=${fp#tls fingerprint }
	name=$(hostname -f 2>/dev/null || hostname 2>/dev/null || echo "<this machine>")
	say "TLS: self-signed certificate in $STATE_DIR/tls/"
	say "paste into AION:"
	say "  URL:         https://$name:7777   (or https://<public IP>:7777)"
	say "  fingerprint: $fp"
}

# 'TEXT', quoted for a shell.
shell_quote() {
	printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# Whether the service user can write DIR (its permissions; the unit's
# sandbox aside).
user_can_write() {
	if command -v runuser >/dev/null 2>&1; then
		runuser -u "$SERVICE_USER" -- test -w "$1" 2>/dev/null
	else
		[ -n "$(find "$1" -prune -user "$SERVICE_USER" 2>/dev/null)" ]
	fi
}

# Project dirs outside the state dir are read-only for the service
# (ProtectSystem=strict; ProtectHome=yes hides /home, /root, /run/user):
# name them, with the drop-in and the chown that would let the service write
# them. Nothing is changed: they are the admin's directories.
advise_project_dirs() {
	[ "$SERVICE_USER" != root ] || return 0
	[ -f "$CONFIG" ] || return 0
	bin=$PREFIX/bin/aion-connector
	# The binary resolves the dirs as the service does (relative ones from
	# the unit's WorkingDirectory, the state dir).
	if ! dirs=$(cd "$STATE_DIR" && "$bin" check --dirs "$CONFIG" 2>/dev/null); then
		say "note: cannot list the config's project dirs ($bin check --dirs $CONFIG failed); see $bin doctor $CONFIG"
		return 0
	fi
	outside=
	paths=
	unwritable=
	home=no
	nl='
'
	while IFS= read -r d; do
		[ -n "$d" ] || continue
		case "$d" in
			"$STATE_DIR" | "$STATE_DIR"/*) continue ;;
		esac
		case "$nl$outside$nl" in
			*"$nl$d$nl"*) continue ;;
		esac
		outside=$outside$d$nl
		case "$d" in
			*' '*) paths="$paths \"$d\"" ;;
			*) paths="$paths $d" ;;
		esac
		case "$d" in
			/home | /home/* | /root | /root/* | /run/user | /run/user/*) home=yes ;;
		esac
		if [ -d "$d" ] && ! user_can_write "$d"; then
			unwritable=$unwritable$d$nl
		fi
	done <<EOF
$dirs
EOF
	[ -n "$outside" ] || return 0
	group=$(id -gn "$SERVICE_USER" 2>/dev/null || echo "$SERVICE_USER")
	say "note: project dirs outside $STATE_DIR are read-only for the service (ProtectSystem=strict):"
	printf '%s' "$outside" | while IFS= read -r d; do say "  $d"; done
	say "to let agents write them, add a drop-in (systemctl edit $UNIT_NAME):"
	say "  [Service]"
	say "  ReadWritePaths=${paths# }"
	if [ "$home" = yes ]; then
		say "  # ProtectHome=yes hides /home, /root and /run/user altogether"
		say "  ProtectHome=read-only"
	fi
	if [ -n "$unwritable" ]; then
		say "and give $SERVICE_USER these (install.sh changes none of them):"
		printf '%s' "$unwritable" | while IFS= read -r d; do say "  chown -R $SERVICE_USER:$group $(shell_quote "$d")"; done
	fi
}

# The shell the web terminal runs for the service user.
service_shell() {
	if [ -x /bin/bash ]; then
		echo /bin/bash
	else
		echo /bin/sh
	fi
}

unit_text() {
	if [ "$SERVICE_USER" = root ]; then
		home=/root
		protect_home=no
	else
		home=$STATE_DIR
		protect_home=yes
	fi
	cat <<EOF
# Written by aion-connector's install.sh; rerunning it rewrites this file.
# Local changes belong in a drop-in: systemctl edit aion-connector
[Unit]
Description=AION Connector
Documentation=man:aion-connector(1)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=$PREFIX/bin/aion-connector $CONFIG
User=$SERVICE_USER
Group=$SERVICE_USER
# Relative project dirs in the config resolve against this directory.
StateDirectory=aion-connector
StateDirectoryMode=0700
WorkingDirectory=$STATE_DIR
# Agents keep their logins and settings under HOME.
Environment=HOME=$home
Environment=SHELL=$(service_shell)
Restart=always
# systemctl reload: SIGHUP re-reads the config and the TLS certificate and key.
ExecReload=/bin/kill -HUP \$MAINPID
RestartSec=5
KillMode=control-group
TimeoutStopSec=20
UMask=0077

# Hardening, as far as agents allow: they need the network, a writable home
# and workspace, pseudo-terminals, Node's JIT (so no MemoryDenyWriteExecute)
# and, for agents that sandbox their tools (bubblewrap), namespaces.
# The file system is read-only but for the state dir (home and the default
# workspace); project dirs elsewhere need a drop-in, e.g.
#   [Service]
#   ReadWritePaths=/srv/aion
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectSystem=strict
ProtectHome=$protect_home
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
LockPersonality=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
KeyringMode=private
RemoveIPC=yes

[Install]
WantedBy=multi-user.target
EOF
}

# The service user: created when missing (a system user, home in the state
# dir, no password); an upgrade from a root install gets its files back.
ensure_user() {
	if [ "$SERVICE_USER" = root ]; then
		say "warning: the service will run as root (--user root): agents and the web terminal get root's rights"
		return 0
	fi
	if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
		create_user
		say "created system user $SERVICE_USER (home $STATE_DIR)"
	fi
	group=$(id -gn "$SERVICE_USER")
	mkdir -p -- "$STATE_DIR"
	chmod 0700 "$STATE_DIR"
	# Upgrades from a root install: the state (spooled posts, workspaces,
	# their mapping) and the config change hands; nothing is moved or lost.
	chown -R "$SERVICE_USER:$group" "$STATE_DIR"
	if [ -f "$CONFIG" ]; then
		chown "$SERVICE_USER:$group" "$CONFIG"
		chmod 0600 "$CONFIG"
	fi
	config_dir=${CONFIG%/*}
	if [ "$config_dir" = /etc/aion-connector ] && [ -d "$config_dir" ]; then
		chown "$SERVICE_USER:$group" "$config_dir"
		chmod 0700 "$config_dir"
	fi
	if [ -d /root/.claude ] || [ -d /root/.codex ] || [ -d /root/.gemini ]; then
		say "note: agent logins made as root stay in /root; log the agents in as the service user:"
		say "  sudo -u $SERVICE_USER -H sh -c 'cd && claude'   (or codex, gemini, ...)"
	fi
}

create_user() {
	shell=$(service_shell)
	if command -v useradd >/dev/null 2>&1; then
		useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
			--shell "$shell" --comment "AION Connector" "$SERVICE_USER" ||
			die "cannot create the user $SERVICE_USER"
	elif command -v adduser >/dev/null 2>&1; then
		# BusyBox (Alpine)
		addgroup -S "$SERVICE_USER" 2>/dev/null || true
		adduser -S -D -H -h "$STATE_DIR" -s "$shell" -G "$SERVICE_USER" "$SERVICE_USER" ||
			die "cannot create the user $SERVICE_USER"
	else
		die "no useradd or adduser to create the user $SERVICE_USER; create it, or use --user"
	fi
}

install_unit() {
	if [ "$SYSTEMD" = no ]; then
		say "systemd unit skipped (--no-systemd)"
		return 0
	fi
	if ! command -v systemctl >/dev/null 2>&1; then
		say "systemd unit skipped (no systemctl on this system)"
		return 0
	fi

	unit_dir=${UNIT_PATH%/*}
	[ -d "$unit_dir" ] || die "$unit_dir does not exist; use --no-systemd"
	[ -w "$unit_dir" ] || die "cannot write $unit_dir (run as root, or use --no-systemd)"

	tmp=$UNIT_PATH.new.$$
	unit_text >"$tmp"
	chmod 0644 "$tmp"
	if [ -f "$UNIT_PATH" ] && cmp -s -- "$tmp" "$UNIT_PATH"; then
		rm -f -- "$tmp"
		say "systemd unit unchanged: $UNIT_PATH"
	else
		if [ -f "$UNIT_PATH" ]; then
			say "systemd unit differs, replaced: $UNIT_PATH"
		else
			say "wrote systemd unit: $UNIT_PATH"
		fi
		mv -f -- "$tmp" "$UNIT_PATH"
		UNIT_CHANGED=yes
	fi

	if [ ! -d /run/systemd/system ]; then
		say "systemd is not running here; to start the service later run:"
		say "  systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
		return 0
	fi

	was_active=no
	if systemctl is-active --quiet "$UNIT_NAME"; then
		was_active=yes
	fi
	systemctl daemon-reload
	systemctl enable --now "$UNIT_NAME"
	if [ "$was_active" = yes ] &&
		{ [ "$BINARY_CHANGED" = yes ] || [ "$UNIT_CHANGED" = yes ]; }; then
		systemctl restart "$UNIT_NAME"
		say "restarted $UNIT_NAME (new binary or unit)"
	elif [ "$was_active" = yes ]; then
		say "$UNIT_NAME is enabled and already running"
	else
		say "enabled and started $UNIT_NAME"
	fi
	say "status: systemctl status $UNIT_NAME; logs: journalctl -u $UNIT_NAME -f"
}

# Install the man page when the checkout has one (also with --binary).
install_manpage() {
	page=$(source_dir)/man/aion-connector.1
	if [ ! -f "$page" ]; then
		return 0
	fi
	mandir=$PREFIX/share/man/man1
	mkdir -p -- "$mandir"
	if [ -f "$mandir/aion-connector.1" ] && cmp -s -- "$page" "$mandir/aion-connector.1"; then
		say "man page unchanged: $mandir/aion-connector.1"
		return 0
	fi
	install -m 0644 "$page" "$mandir/aion-connector.1"
	say "installed $mandir/aion-connector.1"
}

main() {
	parse_args "$@"
	if [ "$PRINT_UNIT" = yes ]; then
		unit_text
		exit 0
	fi
	install_binary
	install_manpage
	install_config
	if [ "$SYSTEMD" = yes ] && command -v systemctl >/dev/null 2>&1; then
		ensure_user
		advise_project_dirs
	fi
	print_tls
	install_unit
	say "check the config with: $PREFIX/bin/aion-connector check $CONFIG"
	say "check the whole setup with: $PREFIX/bin/aion-connector doctor $CONFIG"
}

# AION_INSTALL_SOURCE_ONLY=1: define the functions only (the tests call them).
if [ "${AION_INSTALL_SOURCE_ONLY:-}" != 1 ]; then
	main "$@"
fi

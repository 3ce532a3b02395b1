# What launch/slurm.sh and launch/tpu_pod.sh share, sourced by both: the usage text and errors,
# the options every launcher takes (--config, --workdir, --dry-run, -h, and --config.KEY=VALUE
# overrides after --), and the checks on them. Not run on its own.

CONFIG="" WORKDIR="" DRY_RUN=0
OVERRIDES=()
REPO="$(cd "$(dirname "$0")/.." && pwd)"

# The launcher's header comment, from its second line through the usage example (the second
# bare "#" line).
usage() {
  awk 'NR > 1 { print } NR > 1 && /^#$/ && ++bare == 2 { exit }' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# parse_args "$@": the launcher's own options, each taking a value, are the keys of the
# associative array VALUE_OPTIONS (option -> the variable it sets); the shared ones are read here.
parse_args() {
  while [[ $# -gt 0 ]]; do
    if [[ -n "$1" && -n "${VALUE_OPTIONS[$1]+set}" ]]; then
      printf -v "${VALUE_OPTIONS[$1]}" '%s' "${2:?}"
      shift 2
      continue
    fi
    case "$1" in
      --config) CONFIG="${2:?}"; shift 2 ;;
      --workdir) WORKDIR="${2:?}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage ;;
      --) shift; OVERRIDES=("$@"); break ;;
      *) die "unknown argument $1 (overrides go after --)" ;;
    esac
  done
}

check_config() {
  [[ -f "$REPO/$CONFIG" ]] || die "config $CONFIG not found under $REPO (give it relative to the repo root)"
}

check_overrides() {
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    [[ "$o" == --config.* ]] || die "override $o: only --config.KEY=VALUE overrides go after --"
  done
}

# The overrides, each shell-quoted and after a space, to append to the launch.run arguments.
quoted_overrides() {
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do printf ' %q' "$o"; done
}

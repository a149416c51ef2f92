#!/bin/sh
# The compiler launcher of every compile (CMAKE_<LANG>_COMPILER_LAUNCHER), plus the build's
# progress lines. Two jobs:
#
# 1. Reuse objects across `pip install`s. scikit-build-core deletes <build dir>/CMakeFiles, where
#    CMake keeps the objects, whenever the build runs in a new isolated environment, which pip
#    makes for every install. So the launcher keeps a copy of each object in
#    <build dir>/object_cache, keyed by the compile command (stable: CMakeLists.txt compiles
#    against copies of the build environment's headers) and the compiler, and valid while every
#    file of the compiler's dependency file (the source and every header it read) has the same
#    content (sha256). A valid copy is reused instead of compiling; anything else compiles.
#    JAX_MXFP8_OBJECT_CACHE=0 turns it off; deleting the build directory empties it.
# 2. Show progress. pip shows a build's output only with -v or when it fails, so a CUDA build
#    of minutes would otherwise look like a hang. Lines go to the terminal (/dev/tty) when
#    there is one, else to stderr (pip's log); JAX_MXFP8_BUILD_PROGRESS=0 silences them.
#
# Modes (CMakeLists.txt):
#   start BUILD_DIR                     at configure: remember the time, reset the counts
#   note BUILD_DIR TEXT                 at configure: one progress line
#   compile SOURCE_DIR BUILD_DIR cuda|cxx -- COMPILER ARGS...
#                                       the launcher; progress lines for CUDA files only
#   done BUILD_DIR ON|OFF               the last build step: the total (OFF: no CUDA module)
# The path of this script is part of every compile command, its content is not: editing it
# never causes a rebuild.

say() {  # BUILD_DIR TEXT
  [ "${JAX_MXFP8_BUILD_PROGRESS:-1}" = 0 ] && return 0
  # The first line of a build leaves pip's "Building wheel ... -" line with a newline; the
  # others start with \r + erase-line, which clears the spinner character pip left there.
  lead='\r\033[K'
  if [ -e "$1/progress_first" ]; then
    lead='\n'
    rm -f "$1/progress_first"
  fi
  if { printf "$lead"'jax_mxfp8 build: %s\n' "$2" >/dev/tty; } 2>/dev/null; then
    return 0
  fi
  printf 'jax_mxfp8 build: %s\n' "$2" >&2
}

count() {  # FILE TEXT: one line per object (appends of one short line are atomic)
  printf '%s\n' "$2" >>"$1" 2>/dev/null || true
}

lines() {
  n=$(wc -l <"$1" 2>/dev/null || echo 0)
  echo $((n + 0))
}

deps_of() {  # DEPFILE ("target: dep dep \<newline> dep ..."): the deps, one a line; fails if a
  # name has a space (then the object is not kept)
  grep -q '\\ ' "$1" && return 1
  sed 's/\\$//' "$1" | tr '\n' ' ' | sed 's/^[^:]*:[[:space:]]//' | tr -s ' \t' '\n\n' | grep -v '^$'
}

mode=$1
shift
case "$mode" in
  start)
    mkdir -p "$1"
    date +%s >"$1/progress_start"
    : >"$1/progress_compiled"
    : >"$1/progress_reused"
    : >"$1/progress_first"
    ;;
  note)
    say "$1" "$2"
    ;;
  compile)
    src_dir=$1 build_dir=$2 kind=$3
    shift 4  # SOURCE_DIR BUILD_DIR KIND --
    src="" obj="" dep="" archs="" prev=""
    for arg in "$@"; do
      case "$prev" in
        -c) src=$arg ;;
        -o) obj=$arg ;;
        -MF) dep=$arg ;;
      esac
      case "$arg" in
        --generate-code=*|-gencode=*|-arch=*)
          archs="$archs $(printf '%s\n' "$arg" | grep -o 'sm_[0-9]*a\{0,1\}' | tr '\n' ' ')" ;;
      esac
      prev=$arg
    done
    label=${src#"$src_dir"/}
    archs=$(printf '%s\n' $archs | sort -u | tr '\n' ' ' | sed 's/ $//')
    [ -n "$archs" ] && label="$label for $archs"

    cache="" entry=""
    if [ "${JAX_MXFP8_OBJECT_CACHE:-1}" != 0 ] && [ -n "$obj" ] && [ -n "$dep" ] \
        && command -v sha256sum >/dev/null 2>&1; then
      cache="$build_dir/object_cache"
      compiler=$(command -v "$1" 2>/dev/null || echo "$1")
      key=$( { printf '%s\n' "$@"
               stat -L -c '%s %Y' "$compiler" 2>/dev/null
               printf '%s\n' "NVCC_PREPEND_FLAGS=${NVCC_PREPEND_FLAGS:-}" \
                 "NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:-}" "CPATH=${CPATH:-}" \
                 "CPLUS_INCLUDE_PATH=${CPLUS_INCLUDE_PATH:-}" "C_INCLUDE_PATH=${C_INCLUDE_PATH:-}"
             } | sha256sum | cut -c1-40)
      entry="$cache/$key"
      if [ -f "$entry/manifest" ] && sha256sum --status -c "$entry/manifest" 2>/dev/null \
          && cp "$entry/object" "$obj" && cp "$entry/depfile" "$dep"; then
        if [ "$kind" = cuda ]; then
          count "$build_dir/progress_reused" "$label"
          say "$build_dir" "reused $label (compiled by an earlier build, unchanged since)"
        fi
        exit 0
      fi
    fi

    [ "$kind" = cuda ] && say "$build_dir" "compiling $label ..."
    t0=$(date +%s)
    "$@"
    rc=$?
    if [ $rc -ne 0 ]; then
      [ "$kind" = cuda ] && say "$build_dir" "FAILED: $label (exit $rc; pip prints the compiler's messages)"
      exit $rc
    fi
    if [ "$kind" = cuda ]; then
      count "$build_dir/progress_compiled" "$label"
      say "$build_dir" "compiled $label in $(( $(date +%s) - t0 )) s"
    fi
    if [ -n "$entry" ] && [ -f "$obj" ] && [ -f "$dep" ]; then
      # Store: object, dependency file, and the content hash of every dependency, all or none.
      mkdir -p "$cache" && tmp=$(mktemp -d "$cache/.new.XXXXXX") || exit 0
      if deps_of "$dep" >"$tmp/files" && [ -s "$tmp/files" ] \
          && tr '\n' '\0' <"$tmp/files" | xargs -0 sha256sum >"$tmp/manifest" 2>/dev/null \
          && cp "$obj" "$tmp/object" && cp "$dep" "$tmp/depfile"; then
        rm -rf "$entry" && mv "$tmp" "$entry" 2>/dev/null || rm -rf "$tmp"
      else
        rm -rf "$tmp"
      fi
    fi
    exit 0
    ;;
  done)
    t0=$(cat "$1/progress_start" 2>/dev/null || date +%s)
    compiled=$(lines "$1/progress_compiled")
    reused=$(lines "$1/progress_reused")
    if [ "${2:-ON}" = OFF ]; then
      what="CPU module only"
    elif [ "$compiled" -eq 0 ] && [ "$reused" -eq 0 ]; then
      what="every CUDA object was up to date"
    else
      what="compiled $compiled CUDA file(s), reused $reused from an earlier build"
    fi
    say "$1" "done in $(( $(date +%s) - t0 )) s: $what"
    ;;
  *)
    echo "build_launcher.sh: unknown mode $mode" >&2
    exit 2
    ;;
esac

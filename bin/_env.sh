# Sourced by bin/lab and bin/test: create or refresh the course's local environment in .venv.
# The environment is rebuilt only when requirements.txt or pyproject.toml change (a stamp records their hash).
set -euo pipefail
COURSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COURSE_VENV:-$COURSE_ROOT/.venv}"

pick_python() {
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: the course needs Python 3.10-3.12 (3.11 is tested); none was found on PATH." >&2
  return 1
}

ensure_env() {
  local want have
  want="$(cat "$COURSE_ROOT/requirements.txt" "$COURSE_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  have="$(cat "$VENV/.course-stamp" 2>/dev/null || true)"
  if [[ "$want" == "$have" && -x "$VENV/bin/python" ]]; then
    return 0
  fi
  local py; py="$(pick_python)"
  echo "[course] setting up the environment in $VENV (first run takes a few minutes)..."
  [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$COURSE_ROOT/requirements.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$COURSE_ROOT"
  echo "$want" > "$VENV/.course-stamp"
  echo "[course] environment ready."
}

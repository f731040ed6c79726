#!/usr/bin/env bash
# The steps of the hub-backdoor GitHub Action (action.yml), runnable anywhere:
#   install hub-backdoor (HBD_INSTALL=true), audit the model (`python -m hub_backdoor.integrations
#   audit`: hub-backdoor audit's options, the library's audit), write the SARIF log and the JSON
#   report, read the outcome from its JSON result file (never from printed text), append the verdict
#   and per-class table to $GITHUB_STEP_SUMMARY, and write the outputs (verdict, target, exit-code,
#   sarif-file, report-file, category) to $GITHUB_OUTPUT.
# Exit status: the audit's (0 clean, 1 backdoor, 2 bad input, 3 internal error, 4 inconclusive),
# except that a backdoor exits 0 with HBD_FAIL_ON_BACKDOOR=false.
#
# Inputs (environment): HBD_MODEL (required), HBD_DATASET, HBD_SPLIT, HBD_THRESHOLD, HBD_MAX_SAMPLES,
# HBD_FAIL_ON_BACKDOOR (true), HBD_ARGS (more audit options, split on spaces), HBD_SARIF
# (hub-backdoor.sarif), HBD_REPORT (hub-backdoor.json), HBD_HF_TOKEN, HBD_INSTALL (false), HBD_PACKAGE
# (default: the checkout this script is in), HBD_TORCH_INDEX_URL, HBD_PYTHON (python3).
# Outside GitHub, GITHUB_OUTPUT and GITHUB_STEP_SUMMARY default to /dev/null.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${HBD_PYTHON:-python3}
out=${GITHUB_OUTPUT:-/dev/null}
summary=${GITHUB_STEP_SUMMARY:-/dev/null}
model=${HBD_MODEL:-}
sarif=${HBD_SARIF:-hub-backdoor.sarif}
report=${HBD_REPORT:-hub-backdoor.json}
fail_on_backdoor=$(printf '%s' "${HBD_FAIL_ON_BACKDOOR:-true}" | tr '[:upper:]' '[:lower:]')

output() { printf '%s=%s\n' "$1" "$2" >> "$out"; }

if [ -z "$model" ]; then
  echo "::error title=hub-backdoor::the 'model' input is empty; give a Hub model id or a model folder"
  output verdict error
  output exit-code 2
  exit 2
fi

if [ -n "${HBD_HF_TOKEN:-}" ]; then
  echo "::add-mask::${HBD_HF_TOKEN}"
  export HF_TOKEN="$HBD_HF_TOKEN"
fi

# -- install ----------------------------------------------------------------------------------------
if [ "$(printf '%s' "${HBD_INSTALL:-false}" | tr '[:upper:]' '[:lower:]')" = "true" ]; then
  package=${HBD_PACKAGE:-}
  [ -n "$package" ] || package="$here/../.."
  echo "::group::install hub-backdoor ($package)"
  if [ -n "${HBD_TORCH_INDEX_URL:-}" ]; then
    "$py" -m pip install --disable-pip-version-check -q torch torchvision --index-url "$HBD_TORCH_INDEX_URL" \
      || { echo "::error title=hub-backdoor::installing torch failed"; output verdict error; output exit-code 3; exit 3; }
  fi
  # shellcheck disable=SC2086 # a package spec may be several words ("hub-backdoor==0.1.0 extra")
  "$py" -m pip install --disable-pip-version-check -q $package \
    || { echo "::error title=hub-backdoor::installing hub-backdoor failed"; output verdict error; output exit-code 3; exit 3; }
  echo "::endgroup::"
fi

# -- audit ------------------------------------------------------------------------------------------
args=("$model" --quiet --sarif "$sarif")
[ -n "${HBD_DATASET:-}" ] && args+=(--dataset "$HBD_DATASET")
[ -n "${HBD_SPLIT:-}" ] && args+=(--split "$HBD_SPLIT")
[ -n "${HBD_THRESHOLD:-}" ] && args+=(--threshold "$HBD_THRESHOLD")
[ -n "${HBD_MAX_SAMPLES:-}" ] && args+=(--max-samples "$HBD_MAX_SAMPLES")
if [ -n "${HBD_ARGS:-}" ]; then
  read -r -a extra <<< "$HBD_ARGS"
  args+=("${extra[@]}")
fi
rm -f "$report" "$sarif"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# the audit (the library, not the command line), its reports, the Markdown summary and the outcome
# (exit code, verdict, target, one-line error) as JSON, in one process
echo "hub-backdoor audit ${args[*]} --json $report"
"$py" -m hub_backdoor.integrations audit --report "$report" --markdown "$work/summary.md" \
  --result "$work/result.json" --title "hub-backdoor audit of \`$model\`" -- "${args[@]}"
code=$?
verdict=error
target=""
message=""
if [ -f "$work/result.json" ]; then
  # one field a line: exit code, verdict, target (empty when none), error (empty when none)
  mapfile -t result < <("$py" -c 'import json, sys
r = json.load(open(sys.argv[1]))
for v in (r["exit_code"], r["verdict"], r["target"], r["error"]):
    print("" if v is None else v)' "$work/result.json")
  if [ "${#result[@]}" -eq 4 ]; then
    code=${result[0]}
    verdict=${result[1]}
    target=${result[2]}
    message=${result[3]}
  fi
fi

category="hub-backdoor/$(printf '%s' "$model" | tr -c 'A-Za-z0-9._/-' '_')"
output exit-code "$code"
output category "$category"
[ -f "$sarif" ] && output sarif-file "$sarif"
[ -f "$report" ] && output report-file "$report"

if [ "$verdict" = inconclusive ] && [ -f "$work/summary.md" ]; then
  # inconclusive: the reference data cannot support a verdict; never reported as clean
  output verdict inconclusive
  output target ""
  cat "$work/summary.md" >> "$summary"
  cat "$work/summary.md"
  echo "::error title=hub-backdoor::the audit of $model is inconclusive (see the job summary)"
  exit "$code"
fi

if { [ "$verdict" = backdoor ] || [ "$verdict" = clean ]; } && [ -f "$work/summary.md" ]; then
  output verdict "$verdict"
  output target "$target"
  cat "$work/summary.md" >> "$summary"
  cat "$work/summary.md"
  if [ "$verdict" = backdoor ]; then
    echo "::error title=hub-backdoor::backdoor suspected in $model (target class $target)"
    [ "$fail_on_backdoor" = "false" ] && exit 0
  fi
  exit "$code"
fi

[ -n "$message" ] || message="hub-backdoor audit exited with code $code"
output verdict error
{
  printf '### :x: hub-backdoor audit of `%s`: the audit could not run\n\n' "$model"
  printf 'Exit code %s: %s\n' "$code" "$message"
} >> "$summary"
echo "::error title=hub-backdoor::$message"
[ "$code" -le 1 ] && code=3  # 0 or 1 without a verdict: treat as an internal error
exit "$code"

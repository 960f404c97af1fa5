#!/usr/bin/env bash
# Exhaustive check of verify/qsbr.pml with spin, plus its mutants.
# The model must pass the safety check and the liveness check (weak fairness);
# every mutant must be rejected, so that the check itself cannot pass silently.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp qsbr.pml "$work/"
cd "$work"

build() {  # build [-Dflag...]: a pan verifier for the model
  spin -a "$@" qsbr.pml >/dev/null
  gcc -O2 -w -o pan pan.c -DNFAIR=4 -DCOLLAPSE -DMEMLIM=4096
}

errors_of() { sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$1" | tail -1; }

fail=0

echo "== safety (assertions, invalid end states), exhaustive"
build
./pan -m100000 > safety.out 2>&1 || true
# A plain run checks assertions; the LTL claim is checked separately below.
if [ "$(errors_of safety.out)" != "0" ]; then
  echo "FAIL: the model violates safety"; cat safety.out; fail=1
else
  grep -E "states, stored|errors:" safety.out | sed 's/^/   /'
fi

echo "== liveness: every retired object is eventually released (weak fairness)"
./pan -m100000 -a -f -N released_all > live.out 2>&1 || true
if [ "$(errors_of live.out)" != "0" ]; then
  echo "FAIL: the model violates liveness"; cat live.out; fail=1
else
  grep -E "states, stored|errors:" live.out | sed 's/^/   /'
fi

for mutant in MUTANT_GOAL_OLD MUTANT_NO_CAP MUTANT_EARLY_DETACH MUTANT_LATE_ATTACH MUTANT_EVICT_LIVE; do
  echo "== mutant $mutant must be rejected"
  build "-D$mutant"
  ./pan -m100000 > "$mutant.out" 2>&1 || true
  errs=$(errors_of "$mutant.out")
  if [ -z "$errs" ] || [ "$errs" = "0" ]; then
    echo "FAIL: spin did not reject $mutant"; fail=1
  else
    echo "   rejected: $(grep -m1 -E 'assertion violated|pan:1:' "$mutant.out" || echo "errors: $errs")"
  fi
done

echo "== liveness mutant MUTANT_NO_CATCHUP must be rejected"
build -DMUTANT_NO_CATCHUP
./pan -m100000 -a -f -N released_all > nocatchup.out 2>&1 || true
errs=$(errors_of nocatchup.out)
if [ -z "$errs" ] || [ "$errs" = "0" ]; then
  echo "FAIL: spin did not reject MUTANT_NO_CATCHUP"; fail=1
else
  echo "   rejected: $(grep -m1 -E 'acceptance cycle|pan:1:' nocatchup.out || echo "errors: $errs")"
fi

echo "== liveness mutant MUTANT_NO_EVICT must be rejected"
build -DMUTANT_NO_EVICT
./pan -m100000 -a -f -N released_all > noevict.out 2>&1 || true
errs=$(errors_of noevict.out)
if [ -z "$errs" ] || [ "$errs" = "0" ]; then
  echo "FAIL: spin did not reject MUTANT_NO_EVICT"; fail=1
else
  echo "   rejected: $(grep -m1 -E 'acceptance cycle|pan:1:' noevict.out || echo "errors: $errs")"
fi

if [ "$fail" != 0 ]; then
  echo "verify: FAILED"; exit 1
fi
echo "verify: model passes safety and liveness; all 7 mutants rejected"

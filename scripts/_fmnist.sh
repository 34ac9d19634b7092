# Sourced by demo.sh and test.sh: install the Fashion-MNIST Debian package when it is missing
# and this shell may (root with apt-get); otherwise say so and go on.
if ! [ -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
   || echo "note: could not install dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)"
fi

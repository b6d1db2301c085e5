"""python -m zoo: build the model zoo and the synthetic world once (cached) and print where they live."""

from zoo import ensure_world, ensure_zoo

print(ensure_world())
print(ensure_zoo())

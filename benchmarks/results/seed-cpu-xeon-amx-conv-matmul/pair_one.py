# One run of the seed's batch on random pixels (benchmarks/throughput.py's random_run: 2 epochs of 8
# steps) with the code on PYTHONPATH; prints the second epoch's images a second and the commit.
import sys

sys.path.insert(0, sys.argv[1] + "/benchmarks")
from cifar_onecycle import train
from cifar_onecycle.results import git_commit
from throughput import random_run

recipe, data = random_run(8, 512, device="cpu", precision="bf16")
last = train(recipe, data=data, progress=False).history[-1]
print((git_commit() or "")[:7], round(last.images_per_second, 1), round(last.train_loss, 4))

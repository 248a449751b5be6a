# Holds a file at ARGV1 of 257 MiB (allocated, not written), deleted; answers each line on stdin.
import os, sys
f = open(sys.argv[1], "w+")
os.posix_fallocate(f.fileno(), 0, 257 << 20)
os.unlink(sys.argv[1])
print("holding it", flush=True)
while sys.stdin.readline():
    print("still here", flush=True)

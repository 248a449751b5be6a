# Makes a FIFO at ARGV1, opens it for reading and writing, and fills it with a known pattern until it is
# full; for each line on stdin, reads back what it holds (without waiting), says whether that is the
# pattern, and fills it again.
import os, sys
os.mkfifo(sys.argv[1])
fifo = os.open(sys.argv[1], os.O_RDWR | os.O_NONBLOCK)
pattern = bytes(i % 251 for i in range(1 << 20))
def fill():
    written = 0
    try:
        while True:
            written += os.write(fifo, pattern[written:written + 4096])
    except BlockingIOError:
        pass
    return written
def empty():
    data = b""
    try:
        while True:
            data += os.read(fifo, 65536)
    except BlockingIOError:
        pass
    return len(data), "the pattern" if data == pattern[:len(data)] else "something else"
print("wrote", fill(), flush=True)
while sys.stdin.readline():
    print("read", *empty(), "then wrote", fill(), flush=True)

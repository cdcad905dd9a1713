/*
 * timewaster: a CPU (and memory) load for testing omuscd, after the openMosix tool.
 *
 *   timewaster [-n ITERATIONS] [-s SECONDS] [-m MEGABYTES] [-p EVERY]
 *
 * It does deterministic work (a running checksum over ITERATIONS steps that also walks
 * MEGABYTES of resident memory), prints the checksum every EVERY steps and at the end, so
 * that a run that migrated can be compared byte for byte with one that did not.  With -s it
 * stops after about SECONDS instead (then the checksum depends on the machine's speed).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	unsigned long long iterations = 100000000ULL, every = 0;
	double seconds = 0;
	size_t megabytes = 0;
	int opt;

	while ((opt = getopt(argc, argv, "n:s:m:p:h")) != -1) {
		switch (opt) {
		case 'n': iterations = strtoull(optarg, NULL, 10); break;
		case 's': seconds = atof(optarg); break;
		case 'm': megabytes = strtoul(optarg, NULL, 10); break;
		case 'p': every = strtoull(optarg, NULL, 10); break;
		default:
			fprintf(stderr, "usage: %s [-n ITERATIONS] [-s SECONDS] [-m MEGABYTES] "
				"[-p EVERY]\n", argv[0]);
			return opt == 'h' ? 0 : 2;
		}
	}
	size_t words = megabytes * (1 << 20) / sizeof(uint64_t);
	uint64_t *mem = NULL;
	if (words) {
		mem = malloc(words * sizeof(uint64_t));
		if (!mem) {
			perror("timewaster: malloc");
			return 1;
		}
		for (size_t i = 0; i < words; i++)  /* make it resident */
			mem[i] = i * 2654435761u;
	}
	uint64_t sum = 0;
	double start = now();
	unsigned long long i;
	for (i = 0; i < iterations; i++) {
		sum = sum * 6364136223846793005ULL + i + 1442695040888963407ULL;
		if (words) {
			size_t k = sum % words;
			mem[k] ^= sum;
			sum += mem[k];
		}
		if (every && (i + 1) % every == 0)
			printf("%llu %016llx\n", i + 1, (unsigned long long)sum), fflush(stdout);
		if (seconds > 0 && (i & 0xfffff) == 0 && now() - start >= seconds)
			break;
	}
	printf("checksum %016llx after %llu iterations\n", (unsigned long long)sum, i);
	free(mem);
	return 0;
}

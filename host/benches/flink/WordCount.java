// The Flink side of `cargo bench -p weir --bench flink` (host/benches/flink.rs).
//
// The same word count as the Weir job it is compared with: a generator that
// produces exactly the records of Weir's `generator` source (record i carries
// word(xxh3_64_with_seed(i as 8 little-endian bytes, seed) % keys)), keyed by
// word, counted in a keyed ValueState<Long>, each update ("word n") sent to a
// discarding sink. Parallelism 1, exactly-once checkpoints every second.
//
//   java -cp CLASSES:FLINK/lib/* WordCount run COUNT KEYS SEED hashmap|rocksdb DIR
//       runs the job in a local MiniCluster, with checkpoints and temporary
//       files under DIR, and prints (for the bench to parse):
//         first-record-ms T   wall clock (ms since the epoch) when the first
//                             record reaches the counter
//         job-end-ms T        when the job has finished
//         records-counted N, distinct-words N, largest-count N
//   java -cp ... WordCount words N KEYS SEED
//       prints "i word" for the records 0..N-1 (the bench checks them
//       against Weir's generator).

import java.io.File;
import java.time.Duration;

import org.apache.flink.api.common.JobExecutionResult;
import org.apache.flink.api.common.accumulators.LongCounter;
import org.apache.flink.api.common.accumulators.LongMaximum;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.configuration.CheckpointingOptions;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.CoreOptions;
import org.apache.flink.configuration.StateBackendOptions;
import org.apache.flink.core.execution.CheckpointingMode;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;

public class WordCount {

    // Weir's generator: one syllable per hex digit of the word's index,
    // least significant digit first.
    private static final String[] SYLLABLES = {
        "ka", "lo", "mi", "nu", "pe", "ra", "si", "to",
        "ve", "wu", "xa", "yo", "zi", "bo", "da", "fe",
    };

    static String word(long index) {
        StringBuilder word = new StringBuilder(32);
        long rest = index;
        do {
            word.append(SYLLABLES[(int) (rest & 0xf)]);
            rest >>>= 4;
        } while (rest != 0);
        return word.toString();
    }

    // XXH3-64 with a seed, for an 8-byte input (XXH3's 4-to-8-byte path),
    // the input being `sequence` as little-endian bytes.
    private static final long SECRET_8 = 0x1cad21f72c81017cL; // kSecret[8..16], little-endian
    private static final long SECRET_16 = 0xdb979083e96dd4deL; // kSecret[16..24], little-endian
    private static final long PRIME_MX2 = 0x9fb21c651e98df25L;

    static long xxh3(long sequence, long seed) {
        seed ^= (Integer.reverseBytes((int) seed) & 0xffffffffL) << 32;
        long input1 = sequence & 0xffffffffL; // first 4 bytes
        long input2 = sequence >>> 32; // last 4 bytes
        long bitflip = (SECRET_8 ^ SECRET_16) - seed;
        long keyed = (input2 + (input1 << 32)) ^ bitflip;
        // rrmxmx
        long h = keyed;
        h ^= Long.rotateLeft(h, 49) ^ Long.rotateLeft(h, 24);
        h *= PRIME_MX2;
        h ^= (h >>> 35) + 8;
        h *= PRIME_MX2;
        return h ^ (h >>> 28);
    }

    static long wordIndex(long sequence, long keys, long seed) {
        return Long.remainderUnsigned(xxh3(sequence, seed), Math.max(keys, 1));
    }

    /** The keyed count: ValueState<Long> per word, one "word n" out per record. */
    static class Count extends KeyedProcessFunction<String, String, String> {
        private transient ValueState<Long> count;
        private final LongCounter records = new LongCounter();
        private final LongCounter distinct = new LongCounter();
        private final LongMaximum largest = new LongMaximum();
        private boolean first = true;

        @Override
        public void open(OpenContext context) {
            count = getRuntimeContext().getState(new ValueStateDescriptor<>("count", Types.LONG));
            getRuntimeContext().addAccumulator("records-counted", records);
            getRuntimeContext().addAccumulator("distinct-words", distinct);
            getRuntimeContext().addAccumulator("largest-count", largest);
        }

        @Override
        public void processElement(String word, Context context, Collector<String> out)
                throws Exception {
            if (first) {
                first = false;
                System.out.println("first-record-ms " + System.currentTimeMillis());
            }
            Long previous = count.value();
            long n = previous == null ? 1 : previous + 1;
            count.update(n);
            records.add(1L);
            if (previous == null) {
                distinct.add(1L);
            }
            largest.add(n);
            out.collect(word + " " + n);
        }
    }

    static void run(long records, long keys, long seed, String backend, File dir)
            throws Exception {
        Configuration conf = new Configuration();
        conf.set(StateBackendOptions.STATE_BACKEND, backend);
        conf.set(CheckpointingOptions.CHECKPOINTING_INTERVAL, Duration.ofSeconds(1));
        conf.set(CheckpointingOptions.CHECKPOINTING_CONSISTENCY_MODE, CheckpointingMode.EXACTLY_ONCE);
        conf.set(CheckpointingOptions.CHECKPOINT_STORAGE, "filesystem");
        conf.set(CheckpointingOptions.CHECKPOINTS_DIRECTORY,
                new File(dir, "checkpoints").toURI().toString());
        // Weir's checkpoints are incremental; RocksDB's can be too.
        conf.set(CheckpointingOptions.INCREMENTAL_CHECKPOINTS, backend.equals("rocksdb"));
        conf.set(CoreOptions.TMP_DIRS, new File(dir, "tmp").getPath());
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment(conf);
        env.setParallelism(1);
        env.fromSequence(0, records - 1).name("generator")
                .map(i -> word(wordIndex(i, keys, seed))).returns(Types.STRING).name("word")
                .keyBy(word -> word, Types.STRING)
                .process(new Count()).returns(Types.STRING).name("count")
                .sinkTo(new DiscardingSink<>()).name("discard");
        JobExecutionResult result = env.execute("wordcount");
        System.out.println("job-end-ms " + System.currentTimeMillis());
        for (String name : new String[] {"records-counted", "distinct-words", "largest-count"}) {
            System.out.println(name + " " + result.getAccumulatorResult(name));
        }
    }

    public static void main(String[] args) throws Exception {
        String usage = "usage: WordCount run COUNT KEYS SEED hashmap|rocksdb DIR"
                + " | WordCount words N KEYS SEED";
        if (args.length == 6 && args[0].equals("run")) {
            run(Long.parseLong(args[1]), Long.parseLong(args[2]), Long.parseUnsignedLong(args[3]),
                    args[4], new File(args[5]));
        } else if (args.length == 4 && args[0].equals("words")) {
            long n = Long.parseLong(args[1]);
            long keys = Long.parseLong(args[2]);
            long seed = Long.parseUnsignedLong(args[3]);
            StringBuilder out = new StringBuilder();
            for (long i = 0; i < n; i++) {
                out.append(i).append(' ').append(word(wordIndex(i, keys, seed))).append('\n');
            }
            System.out.print(out);
        } else {
            System.err.println(usage);
            System.exit(2);
        }
    }
}
